"""`fastslm-run --backend torch` end to end, and its one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from fastslm.models.tiny import build_tiny_model
from fastslm.runtime.errors import OptionError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cli")
    build_tiny_model(folder, seed=2)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fastslm.runtime.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_run_end_to_end_json(tiny_dir, jfk_path):
    result = run_cli("--backend", "torch", "--model", str(tiny_dir), "--json", "--max-new-tokens", "12", str(jfk_path), str(jfk_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    assert records[0]["windows"] == 1 and records[0]["audio_seconds"] == pytest.approx(11.0, abs=0.01)
    assert records[0]["backend"] == "torch" and 1 <= records[0]["answer_tokens"] <= 12
    assert records[0]["text"] == records[1]["text"]  # greedy is deterministic
    assert "model tiny-random on torch" in result.stderr


def make_bad_inputs(folder, jfk_path):
    empty = folder / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    text = folder / "notes.wav"
    text.write_text("this is not audio\n")
    corrupt = folder / "cut.flac"
    corrupt.write_bytes(jfk_path.read_bytes()[:5000])
    nan = folder / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    return {"empty": empty, "not audio": text, "corrupt": corrupt, "nan": nan, "missing": folder / "missing.wav"}


@pytest.mark.parametrize("case", ["empty", "not audio", "corrupt", "nan", "missing"])
def test_bad_audio_gives_one_error_line(tmp_path, tiny_dir, jfk_path, case):
    path = make_bad_inputs(tmp_path, jfk_path)[case]
    result = run_cli("--backend", "torch", "--model", str(tiny_dir), str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(path.name) in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--backend", "tensorflow"], "unknown backend"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_options_give_one_error_line(tiny_dir, jfk_path, args, message):
    base = ["--model", str(tiny_dir)] if "--model" not in args else []
    result = run_cli(*base, *args, str(jfk_path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("raised, code, line", [
    (OptionError("--top-p must be in (0, 1]"), 2, "fastslm-x: error: --top-p must be in (0, 1]"),
    (KeyboardInterrupt(), 130, "fastslm-x: error: interrupted; nothing was written"),
])
def test_every_cli_reports_user_errors_and_ctrl_c_in_one_line(raised, code, line, capsys):
    from fastslm.runtime.errors import reported_in_one_line

    with pytest.raises(SystemExit) as exc_info:  # a plain SystemExit: typer apps and argparse scripts alike
        with reported_in_one_line("fastslm-x", "interrupted; nothing was written"):
            raise raised
    assert exc_info.value.code == code
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        with reported_in_one_line("fastslm-x"):
            1 / 0


def test_the_model_config_chooses_the_default_decoding(tmp_path, jfk_path):
    """A config.json "decoding" object is how the model is read unless an option says otherwise."""
    from fastslm.runtime.generate import Pipeline

    folder = tmp_path / "beam3"
    build_tiny_model(folder, seed=2, varied_llm=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decoding": {"beam_size": 3, "max_new_tokens": 6}}))
    pipe = Pipeline.load(folder, "torch")
    assert pipe.sampling.beam_size == 3 and pipe.sampling.max_new_tokens == 6
    assert pipe.generate(str(jfk_path)).token_ids == pipe.generate(str(jfk_path), sampling=pipe.sampling).token_ids

    def text(*args):
        result = run_cli("--backend", "torch", "--model", str(folder), "--json", str(jfk_path), *args)
        assert result.returncode == 0, result.stderr
        return result.stderr, json.loads(result.stdout)["text"]

    banner, default = text()
    assert ", beam search 3" in banner
    assert default == text("--beam-size", "3", "--max-new-tokens", "6")[1]
    banner, greedy = text("--beam-size", "1")
    assert ", greedy" in banner and greedy == text("--beam-size", "1", "--max-new-tokens", "6")[1]
    assert ", sampling at temperature 0.7" in text("--temperature", "0.7", "--seed", "1")[0]  # no beam error

    (folder / "config.json").write_text(json.dumps({**config, "decoding": {"beam": 3}}))
    result = run_cli("--backend", "torch", "--model", str(folder), str(jfk_path))
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and "unknown option(s) beam" in errors[0], result.stderr
    assert str(folder / "config.json") in errors[0]  # the file to fix, not "the model config"
