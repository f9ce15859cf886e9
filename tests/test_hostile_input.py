"""The hostile-user defects of issue 18, each reproduced as reported, on the shipped demo bundle.

Every refusal is one `FastSLMError` line (exit 2 in the CLIs), never a traceback, a hang or
silent damage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fastslm.runtime.bundle import load_bundle, sha256_file
from fastslm.runtime.cli import app as run_app
from fastslm.runtime.errors import AudioError, ModelFileError, OptionError
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEFAULT_MODEL_DIR
from fastslm.runtime.sampling import SamplingOptions

runner = CliRunner()


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.load(DEFAULT_MODEL_DIR)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("fastslm-run: model ")]


def _one_error_line(result, *needles: str) -> str:
    lines = _error_lines(result)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("fastslm-run: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- defect 2: an infinite rate hung soxr --------------------------------------------------


def test_transcribe_with_an_infinite_rate_returns_an_error(demo):
    outcome = []

    def call():
        try:
            demo.transcribe(np.zeros(16000, "float32"), float("inf"))
        except AudioError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert outcome and "sample rate inf" in str(outcome[0]), "transcribe(..., inf) hung or did not refuse"


# ---- defect 3: tracebacks ------------------------------------------------------------------


def test_non_utf8_prompt_bytes_in_a_real_process(jfk_path):
    """`--prompt "$(printf 'abc\\xff\\xfe def?')"`: Python hands the bytes over as lone surrogates."""
    result = subprocess.run(
        [sys.executable, "-m", "fastslm.runtime.cli", "--prompt", b"abc\xff\xfe def?", str(jfk_path)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("fastslm-run: model ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines == ["fastslm-run: error: the prompt is not valid UTF-8 text (byte 0xff at character 3): pass UTF-8 text"]


@pytest.mark.parametrize("prompt", ["abc\udcff def", "x\ud800y", "\udfff"], ids=["escaped-byte", "surrogate", "lone-low"])
def test_non_utf8_prompts_are_one_option_error(demo, prompt):
    with pytest.raises(OptionError, match="not valid UTF-8"):
        demo.prompt_ids(prompt)


def test_convert_with_a_corrupt_qwen_tokenizer(tmp_path):
    pytest.importorskip("torch")
    from fastslm.models.convert import app as convert_app

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "tokenizer.json").write_text('{1: "not a key"}')
    result = runner.invoke(convert_app, ["--checkpoint", str(tmp_path / "c.pt"), "--qwen", str(qwen), "--out", str(tmp_path / "o")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"fastslm-convert: error: tokenizer file {qwen / 'tokenizer.json'} is unreadable (key must be a string")
    assert not (tmp_path / "o").exists()


def _copy_demo_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_MODEL_DIR, bundle)
    return bundle


def _relist(bundle: Path, name: str, **manifest_edits) -> None:
    """Re-hash a tampered file into the manifest: a careful forger, not a damaged copy."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    manifest.update(manifest_edits)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_with_a_short_embedding_table(tmp_path, jfk_path):
    bundle = _copy_demo_bundle(tmp_path)
    table = np.load(bundle / "embed_tokens.npy")
    np.save(bundle / "embed_tokens.npy", table[:100])
    _relist(bundle, "embed_tokens.npy")
    with pytest.raises(ModelFileError, match=rf"shaped \[100, 256\], config.json needs {table.dtype} \[2048, 256\]"):
        load_bundle(bundle)
    _one_error_line(runner.invoke(run_app, ["--model", str(bundle), str(jfk_path)]), "embed_tokens.npy")


@pytest.mark.parametrize("config", ["null", "[]", '"fastslm"', "3"])
def test_a_config_that_is_json_but_not_an_object_is_one_line(tmp_path, jfk_path, config):
    """Found by test_fuzz_bundle_config: `null` as config.json was an AttributeError traceback."""
    bundle = _copy_demo_bundle(tmp_path)
    (bundle / "config.json").write_text(config)
    _relist(bundle, "config.json")
    with pytest.raises(ModelFileError, match="is not a fastslm model config"):
        load_bundle(bundle)
    _one_error_line(runner.invoke(run_app, ["--model", str(bundle), str(jfk_path)]), "not a fastslm model config")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    _one_error_line(runner.invoke(run_app, ["--model", str(folder), str(jfk_path)]), "neither a fastslm model folder")


def test_bundle_with_a_garbled_embedding_header(tmp_path):
    bundle = _copy_demo_bundle(tmp_path)
    data = bytearray((bundle / "embed_tokens.npy").read_bytes())
    data[:6] = b"NOTNPY"
    (bundle / "embed_tokens.npy").write_bytes(bytes(data))
    _relist(bundle, "embed_tokens.npy")
    with pytest.raises(ModelFileError, match="not a readable .npy table"):
        load_bundle(bundle)


def test_bundle_with_a_tokenizer_larger_than_the_table(tmp_path, demo):
    from fastslm.runtime.loading import load_pipeline

    bundle = _copy_demo_bundle(tmp_path)
    tok = json.loads((bundle / "tokenizer.json").read_text())
    next_id = demo.tokenizer.vocab_size
    tok["added_tokens"] += [{"id": next_id + i, "content": f"<|extra{i}|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for i in range(2100 - next_id)]  # fmt: skip
    (bundle / "tokenizer.json").write_text(json.dumps(tok))
    _relist(bundle, "tokenizer.json")
    with pytest.raises(ModelFileError, match="more than the model's 2048 embeddings"):
        load_pipeline(bundle)


# ---- defect 5: misleading messages ---------------------------------------------------------


def test_a_huge_prompt_is_blamed_on_the_prompt(jfk_path):
    prompt = "why " * 15000  # 60,000 characters
    line = _one_error_line(runner.invoke(run_app, ["--prompt", prompt, str(jfk_path)]), "the prompt is", "shorten the prompt")
    assert "max_new_tokens" not in line


def test_max_new_tokens_is_still_blamed_when_it_is_the_cause(demo):
    with pytest.raises(OptionError, match=r"max_new_tokens 8100 .* lower it to at most"):
        demo.check_context(5.0, "transcribe", None, 8100)


@pytest.mark.parametrize("temperature", ["1e-320", "1e-9"])
def test_a_vanishing_temperature_is_refused_in_one_line(jfk_path, temperature):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning may escape either
        result = runner.invoke(run_app, ["--temperature", temperature, str(jfk_path)])
    _one_error_line(result, f"temperature {float(temperature)!r} is too small", "use 0 for greedy")


def test_small_but_usable_temperature_samples(demo, jfk_path):
    speech = demo.encode(jfk_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = demo.generate(speech, sampling=SamplingOptions(temperature=1e-4, seed=0, max_new_tokens=8)).text
    greedy = demo.generate(speech, sampling=SamplingOptions(max_new_tokens=8)).text
    assert text == greedy  # at 1e-4 the distribution is a point mass on the argmax


def test_json_mode_emits_a_record_for_a_failed_file(tmp_path, jfk_path):
    missing = tmp_path / "missing.wav"
    result = runner.invoke(run_app, ["--json", "--max-new-tokens", "4", str(missing), str(jfk_path)])
    assert result.exit_code == 2
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["audio"] for r in records] == [str(missing), str(jfk_path)]
    assert "does not exist" in records[0]["error"] and "text" in records[1]


# ---- defect 8: --providers with the tensorrt backend ---------------------------------------


def test_providers_with_the_tensorrt_backend_is_one_line(jfk_path):
    result = runner.invoke(run_app, ["--backend", "tensorrt", "--providers", "cpu", str(jfk_path)])
    _one_error_line(result, "providers does not apply to the tensorrt backend")


def test_pipeline_closes_its_backend_as_a_context_manager(demo):
    closed = []

    class Backend:
        def close(self):
            closed.append(True)

    with Pipeline(Backend(), demo.tokenizer) as pipe:
        assert not closed
    assert closed == [True]
    pipe.close()  # a backend without close (onnx) is fine too
    Pipeline(object(), demo.tokenizer).close()
