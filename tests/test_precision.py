"""--precision (issue #15): the shipped default is the CPU-fast variant; other precisions are asked for by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastslm.runtime.errors import OptionError
from fastslm.runtime.loading import DEFAULT_MODEL_DIR, DEFAULT_MODEL_FOLDER, resolve_precision, shipped_bundles
from fastslm.runtime.bundle import read_manifest

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="needs the shipped demo model")


def test_auto_is_the_shipped_default_and_names_resolve_to_shipped_bundles():
    shipped = shipped_bundles()
    default = read_manifest(DEFAULT_MODEL_DIR)["precision"]
    assert shipped[default] == DEFAULT_MODEL_DIR
    assert resolve_precision(None, "auto", "auto") is None
    assert resolve_precision(None, default, "auto") == DEFAULT_MODEL_DIR
    missing = next(p for p in ("fp32", "fp16", "int8", "int4") if p not in shipped)
    with pytest.raises(OptionError, match=f"--target onnx(-{missing})?"):
        resolve_precision(None, missing, "auto")
    with pytest.raises(OptionError, match=f"is a {default} bundle"):
        resolve_precision(DEFAULT_MODEL_DIR, missing, "onnx")
    with pytest.raises(OptionError, match="unknown precision"):
        resolve_precision(None, "fp8", "auto")
    assert resolve_precision(DEFAULT_MODEL_FOLDER, "fp16", "torch") == DEFAULT_MODEL_FOLDER


def test_cli_banner_names_the_variant_and_bad_precision_is_one_line(tmp_path):
    code = "from fastslm.runtime.cli import main; main()"
    wav = tmp_path / "quiet.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, np.zeros(16000, np.float32), 16000)
    ok = subprocess.run([sys.executable, "-c", code, str(wav)], capture_output=True, text=True, timeout=300)
    default = read_manifest(DEFAULT_MODEL_DIR)["precision"]
    assert ok.returncode == 0 and f"on onnx {default} (" in ok.stderr  # e.g. "on onnx int8 (CPUExecutionProvider)"
    bad = subprocess.run([sys.executable, "-c", code, "--precision", "fp8", str(wav)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown precision" in bad.stderr
