"""The runtime needs no PyTorch: a bundle runs in a process where `import torch` fails, and
gives the tokens the PyTorch reference gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastslm.export.bundle_writer import ExportOptions, export_bundle
from fastslm.models.tiny import build_tiny_model
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEFAULT_MODEL_FOLDER
from fastslm.runtime.sampling import SamplingOptions

MAX_NEW_TOKENS = 24

# Runs first in the child: every import of torch (or anything under it) raises ImportError, as
# on a machine where it was never installed.
BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"No module named {name!r} (blocked: the runtime must not need it)")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker does not work")
    """
)

PIPELINE = BLOCK_TORCH + textwrap.dedent(
    """
    import json
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.sampling import SamplingOptions

    bundle, audio, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pipe = Pipeline.load(bundle)
    result = pipe.generate(audio, "transcribe", sampling=SamplingOptions(max_new_tokens=n))
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "fastslm.models", "fastslm.export")))
    print(json.dumps({"backend": pipe.backend.name, "tokens": result.token_ids, "text": result.text, "leaked": leaked}))
    """
)

CLI = BLOCK_TORCH + textwrap.dedent(
    """
    from fastslm.runtime.cli import main
    sys.argv = ["fastslm-run", *sys.argv[1:]]
    main()
    """
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-torch")
    build_tiny_model(root / "model", seed=4)
    export_bundle(ExportOptions(model=root / "model", out=root / "bundle", progress=False), log=lambda line: None)
    return root / "model", root / "bundle"


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_pipeline_without_torch_matches_the_reference(folders, jfk_path):
    model, bundle = folders
    result = run_without_torch(PIPELINE, str(bundle), str(jfk_path), str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    assert got["backend"] == "onnx" and got["leaked"] == []
    reference = Pipeline.load(model, backend="torch").generate(
        jfk_path, "transcribe", sampling=SamplingOptions(max_new_tokens=MAX_NEW_TOKENS)
    )
    assert got["tokens"] == reference.token_ids and len(got["tokens"]) > 0
    assert got["text"] == reference.text


def test_cli_without_torch(folders, jfk_path):
    model, bundle = folders
    result = run_without_torch(CLI, "--model", str(bundle), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", str(jfk_path))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    reference = Pipeline.load(model, backend="torch").generate(
        jfk_path, "transcribe", sampling=SamplingOptions(max_new_tokens=MAX_NEW_TOKENS)
    )
    assert record["backend"] == "onnx" and record["text"] == reference.text
    assert record["answer_tokens"] == len(reference.token_ids)


def test_torch_backend_without_torch_is_one_clear_line(folders, jfk_path):
    model, _ = folders
    result = run_without_torch(CLI, "--model", str(model), "--backend", "torch", str(jfk_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs PyTorch" in lines[0], result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL_FOLDER.is_dir(), reason="the demo model is not shipped yet (models/demo/shipped/model)")
def test_exported_demo_model_without_torch_reproduces_the_pytorch_transcript(tmp_path, jfk_path):
    """`fastslm-export --target onnx` of the shipped demo folder, then the runtime with torch
    unimportable: the words of the PyTorch reference on jfk.flac, token for token."""
    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(model=DEFAULT_MODEL_FOLDER, out=bundle, progress=False), log=lambda line: None)
    result = run_without_torch(PIPELINE, str(bundle), str(jfk_path), "64")
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    reference = Pipeline.load(DEFAULT_MODEL_FOLDER, backend="torch").generate(
        jfk_path, "transcribe", sampling=SamplingOptions(max_new_tokens=64)
    )
    assert got["leaked"] == [] and got["tokens"] == reference.token_ids and got["text"] == reference.text
    assert "fellow" in got["text"]  # it transcribes (the demo model's words, not a random model's)
