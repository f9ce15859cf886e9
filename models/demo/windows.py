"""Training windows of the demo recipe: utterances joined into <= 30 s windows, with their prompts.

A window is one Whisper input (30 s of audio, the unit FastSLM encodes). Training only on
single 2-6 s utterances would leave most of every window as padding and never show the model
speech that fills a window, so windows are composed:

* ``single_fraction`` (30 %) of the windows hold one utterance;
* the others draw a target length uniformly in [min_seconds, max_seconds] (10-30 s) and take
  utterances in order until the next one would pass the target or the 30 s window;
* consecutive utterances are separated by digital silence of 0.1-0.8 s (whole samples);
* utterances are consumed from a seeded shuffle, each one once per pass; ``passes`` (may be
  fractional) sets how many windows there are.

Each window is saved as a spec (utterance ids + gaps in samples, never the audio), so
``window_audio`` rebuilds the same samples from the corpus every time. Each spec also carries
its training examples, each an exact (task, instruction, answer) triple:

* ASR with the default instruction, answer = the utterance texts joined by spaces;
* for windows of at most ``qa_max_seconds`` (the single utterances and the short pairs), the
  questions of :mod:`fastslm.models.demo.tasks` (two draws, duplicates removed). The task of a
  question is what :func:`fastslm.runtime.prompt.resolve_task` gives at inference, so training
  and inference prompts are identical ("Summarize in three words." resolves to SSUM, the other
  questions to SQQA).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...calibration.evaluation import Utterance, read_corpus  # noqa: F401 (the recipe reads its corpus through here)
from ...runtime.audio import SAMPLE_RATE, WINDOW_SAMPLES, load_audio
from ...runtime.errors import FastSLMError
from ...runtime.prompt import resolve_task
from . import tasks

# Synthesized utterances already start and end with a little silence; a window may run past
# 30 s by at most this much through rounding of the corpus's "seconds", and is then cut there.
_TRIM_TOLERANCE_SAMPLES = SAMPLE_RATE // 5


class RecipeError(FastSLMError):
    """The recipe's inputs are missing or inconsistent; the message says what to run."""


@dataclass(frozen=True)
class WindowOptions:
    seed: int = 0
    single_fraction: float = 0.3
    min_seconds: float = 10.0
    max_seconds: float = 30.0
    gap_seconds: tuple[float, float] = (0.1, 0.8)
    passes: float = 1.0  # each train utterance appears in this many windows (on average)
    qa_max_seconds: float = 15.0
    qa_draws: int = 2  # questions_for calls per QA window (duplicates removed)

    def __post_init__(self) -> None:
        if not 0 < self.max_seconds <= WINDOW_SAMPLES / SAMPLE_RATE:
            raise ValueError(f"max_seconds {self.max_seconds} must be in (0, 30]: a window is at most 30 s")
        if not 0 <= self.single_fraction <= 1:
            raise ValueError(f"single_fraction {self.single_fraction} must be in [0, 1]")
        object.__setattr__(self, "gap_seconds", tuple(self.gap_seconds))


# ---------------------------------------------------------------------------------------------
# Composition


def compose_windows(utterances: list[Utterance], options: WindowOptions = WindowOptions()) -> list[dict]:
    """Window specs {"id", "utts": [ids], "gaps": [samples], "samples", "text"}; pure and seeded."""
    rng = random.Random(f"windows:{options.seed}")
    limit = int(options.max_seconds * SAMPLE_RATE)
    usable = [u for u in utterances if u.samples <= limit]
    if not usable:
        raise RecipeError("no corpus utterance fits in a window: check the corpus split")
    stream: list[Utterance] = []
    total = max(1, round(options.passes * len(usable)))
    while len(stream) < total:
        order = list(usable)
        rng.shuffle(order)
        stream.extend(order[: total - len(stream)])

    windows, i = [], 0
    lo_gap, hi_gap = (int(round(s * SAMPLE_RATE)) for s in options.gap_seconds)
    while i < len(stream):
        first = stream[i]
        i += 1
        utts, gaps, length = [first], [], first.samples
        if rng.random() >= options.single_fraction:
            target = int(rng.uniform(options.min_seconds, options.max_seconds) * SAMPLE_RATE)
            while i < len(stream) and length < target:
                gap = rng.randint(lo_gap, hi_gap)
                if length + gap + stream[i].samples > limit:
                    break  # the next utterance starts the next window
                utts.append(stream[i])
                gaps.append(gap)
                length += gap + stream[i].samples
                i += 1
        windows.append({
            "id": f"w{len(windows):06d}",
            "utts": [u.id for u in utts],
            "gaps": gaps,
            "samples": length,
            "text": " ".join(u.text.strip() for u in utts),
        })
    return windows


def add_examples(windows: list[dict], options: WindowOptions = WindowOptions()) -> list[dict]:
    """Attach each window's training examples (see the module docstring); seeded."""
    rng = random.Random(f"examples:{options.seed}")
    qa_limit = options.qa_max_seconds * SAMPLE_RATE
    for w in windows:
        task, instruction = resolve_task(None)
        examples = [{"task": task.name, "instruction": instruction, "answer": w["text"]}]
        if w["samples"] <= qa_limit:
            seen = set()
            for _ in range(options.qa_draws):
                for question, ans in tasks.questions_for(w["text"], rng):
                    if question in seen:
                        continue
                    seen.add(question)
                    task, instruction = resolve_task(question)
                    examples.append({"task": task.name, "instruction": instruction, "answer": ans})
        w["examples"] = examples
    return windows


def window_audio(spec: dict, utterances: dict[str, Utterance]) -> np.ndarray:
    """Rebuild a window's float32 16 kHz samples from the corpus (at most 30 s)."""
    parts = []
    for k, uid in enumerate(spec["utts"]):
        if k:
            parts.append(np.zeros(spec["gaps"][k - 1], dtype=np.float32))
        utt = utterances.get(uid)
        if utt is None:
            raise RecipeError(f"window {spec['id']} uses utterance {uid}, which the corpus lacks: "
                              "rerun the windows stage")
        parts.append(load_audio(utt.path))
    audio = np.concatenate(parts)
    if len(audio) > WINDOW_SAMPLES:
        if len(audio) - WINDOW_SAMPLES > _TRIM_TOLERANCE_SAMPLES:
            raise RecipeError(f"window {spec['id']} is {len(audio) / SAMPLE_RATE:.2f} s, over 30 s: "
                              "the corpus 'seconds' do not match its audio; rerun the windows stage")
        audio = audio[:WINDOW_SAMPLES]
    return audio


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RecipeError(f"{path} is missing: run the stage that writes it first")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_windows(train: list[Utterance], out: Path, options: WindowOptions = WindowOptions()) -> list[dict]:
    """The windows stage: compose, attach examples, write ``out`` (JSONL, first line = options)."""
    windows = add_examples(compose_windows(train, options), options)
    header = {"format": "fastslm-demo-windows", "options": asdict(options), "n_utterances": len(train)}
    write_jsonl(out, [header, *windows])
    return windows


def load_windows(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows or rows[0].get("format") != "fastslm-demo-windows":
        raise RecipeError(f"{path} is not a windows file: rerun the windows stage")
    return rows[1:]


def summarize(windows: list[dict]) -> str:
    seconds = np.array([w["samples"] for w in windows]) / SAMPLE_RATE
    singles = sum(len(w["utts"]) == 1 for w in windows)
    qa = sum(len(w["examples"]) > 1 for w in windows)
    return (f"{len(windows)} windows, {seconds.sum() / 3600:.2f} h of audio, mean {seconds.mean():.1f} s "
            f"(min {seconds.min():.1f}, max {seconds.max():.1f}); {singles} single-utterance, "
            f"{qa} with questions ({sum(len(w['examples']) - 1 for w in windows)} questions)")
