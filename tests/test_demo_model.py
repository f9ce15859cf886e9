"""The shipped demo model (issue #4) really transcribes and answers, through every CPU backend.

Runs the default model exactly as a user gets it (no --model): the ONNX bundle in
models/demo/shipped/onnx, and the model folder next to it through the PyTorch reference. The
bounds are what the shipped model measured (docs/DEMO_MODEL.md) plus a small margin, so a
regression in the mel frontend, the prompt, a backend or the bundle fails here. jfk.flac is held
to issue #20's target (15 %); the synthetic subsets and QA to the measurement plus margin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastslm.models.demo.evaluate import (
    EVAL_SUBSET,
    answer_all,
    load_split,
    qa_report,
    questions_for_items,
    transcribe_all,
    wer,
)
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEFAULT_MODEL_DIR, DEFAULT_MODEL_FOLDER, DEFAULT_MODEL_NOTE

from .conftest import JFK_TRANSCRIPT

SHIPPED_LIMIT_MB = 80.0

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR.is_dir() and DEFAULT_MODEL_FOLDER.is_dir()),
    reason="the demo model is not shipped yet (models/demo/shipped/{model,onnx}, issue #4)",
)

# Measured on the shipped model (the recipe's run 8, weight average at step 8,000, INT8 ONNX
# bundle; 2026-12-01): jfk 13.64 % through fastslm-run (3 of 22 words), eval subset greedy 22.75 %
# (seen voices) / 23.81 % (unseen voice), beam 4 19.05 % / 22.22 %, QA 60.0 % on the 12 utterances
# below (60 questions, so +-6 pt is one utterance's worth); a few points of margin for ONNX Runtime
# versions.
MAX_WER = {"jfk": 15.0, "eval_seen": 27.0, "eval_unseen": 27.0}
# The recipe's eval stage reads jfk.flac as one untrimmed window (Pipeline.transcribe), not through
# fastslm-run's voice-activity segments: 13.64% measured on 2026-12-01 with the default bundle.
MAX_WER_JFK_WHOLE_WINDOW = 20.0
MIN_QA = 50.0
QA_ITEMS = 12  # 5 questions each


@pytest.fixture(scope="module")
def onnx_pipe() -> Pipeline:
    return Pipeline.load()


@pytest.fixture(scope="module")
def torch_pipe() -> Pipeline:
    return Pipeline.load(DEFAULT_MODEL_FOLDER, "torch")


def test_shipped_model_fits_the_size_budget():
    files = [p for d in (DEFAULT_MODEL_DIR, DEFAULT_MODEL_FOLDER) for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) / 1e6 <= SHIPPED_LIMIT_MB


def test_default_run_transcribes_jfk(jfk_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "fastslm.runtime.cli", str(jfk_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    banner = [line for line in result.stderr.splitlines() if line.startswith("fastslm-run: model")]
    assert len(banner) == 1 and DEFAULT_MODEL_NOTE in banner[0] and "onnx" in banner[0]
    assert ", beam search 4" in banner[0]  # the decoding the shipped config.json recommends
    assert wer([JFK_TRANSCRIPT], [result.stdout.strip()]) <= MAX_WER["jfk"], result.stdout


def test_the_shipped_model_recommends_beam_search(onnx_pipe, torch_pipe):
    """The recipe writes "decoding" into config.json; the bundle carries the same config (hashed)."""
    assert onnx_pipe.sampling.beam_size == torch_pipe.sampling.beam_size == 4
    assert onnx_pipe.sampling.greedy


@pytest.mark.slow
@pytest.mark.parametrize("beam_size", [1, 4])
@pytest.mark.parametrize("split", ["eval_seen", "eval_unseen"])
def test_eval_subset_wer(onnx_pipe, split, beam_size):
    items = load_split(split, EVAL_SUBSET)
    hyps = transcribe_all(onnx_pipe, [it.audio for it in items], max_new_tokens=96, beam_size=beam_size)
    assert wer([it.text for it in items], hyps) <= MAX_WER[split]


@pytest.mark.slow
def test_reference_and_bundle_agree(onnx_pipe, torch_pipe, jfk_path):
    """The PyTorch reference (fp16 weights, computed in fp32) and the shipped INT8 bundle: as accurate.

    The bundle is the exporter's INT8 (its gates: whole bundle within +1 pt on 41 utterances), so
    its words differ from the reference's in places; it must not transcribe worse than the gates allow."""
    items = load_split("eval_seen", EVAL_SUBSET)[:10]
    inputs = [jfk_path] + [it.audio for it in items]
    truth = [JFK_TRANSCRIPT] + [it.text for it in items]
    onnx = transcribe_all(onnx_pipe, inputs, max_new_tokens=96)
    ref = transcribe_all(torch_pipe, inputs, max_new_tokens=96)
    # measured 2026-12-01 (run 8): the two read each other at 8.06% WER; against the truth both
    # scored 21.31% (run 4: 3.3% apart, 25.4% and 23.8%)
    assert wer(ref, onnx) <= 12.0, list(zip(ref, onnx))
    assert wer(truth, onnx) <= wer(truth, ref) + 3.0, list(zip(truth, onnx))


@pytest.mark.slow
def test_spoken_question_answering(onnx_pipe):
    items = load_split("eval_seen", EVAL_SUBSET)[:QA_ITEMS]
    speech = [onnx_pipe.encode(str(it.audio)) for it in items]
    questions = questions_for_items(items)
    accuracy, _ = qa_report(questions, answer_all(onnx_pipe, speech, questions))
    assert accuracy >= MIN_QA


@pytest.mark.slow
def test_recipe_eval_scores_real_speech_beside_faster_whisper(tmp_path, monkeypatch, capsys):
    """The recipe's eval stage: each WER (held-out synthetic sets and jfk.flac, the real recording) is
    printed beside faster-whisper tiny.en's on the same audio; the baseline is cached."""
    import json

    from fastslm.models.demo import evaluate
    from fastslm.models.demo.recipe import stage_eval

    cache, report = tmp_path / "faster_whisper.json", tmp_path / "eval.json"
    results = stage_eval(DEFAULT_MODEL_DIR, EVAL_SUBSET, 2, report, cache, threads=2, progress=False)
    rows = {r["split"]: r for r in results}
    assert rows["jfk"]["real_speech"] and not rows["eval_seen"]["real_speech"]
    assert rows["jfk"]["faster_whisper_wer"] == 0.0 and rows["jfk"]["wer"] <= MAX_WER_JFK_WHOLE_WINDOW
    assert all(0.0 <= rows[s]["faster_whisper_wer"] <= 50.0 for s in ("eval_seen", "eval_unseen"))
    assert rows["qa"]["n"] == 10 and "faster_whisper_wer" not in rows["qa"]
    captured = capsys.readouterr()
    out = captured.out
    assert "utt/s" not in captured.err  # --no-progress: no bars in the recipe's driver.log
    assert f"eval: jfk (real speech): WER {rows['jfk']['wer']:.2f}% (faster-whisper tiny.en 0.00%)" in out
    assert json.loads(report.read_text())["results"] == json.loads(json.dumps(results))

    def must_not_run(*args, **kwargs):
        raise AssertionError("faster-whisper ran again for a cached split")

    monkeypatch.setattr(evaluate, "faster_whisper_transcripts", must_not_run)
    assert evaluate.faster_whisper_wer("jfk", EVAL_SUBSET, None, cache)["wer"] == 0.0
