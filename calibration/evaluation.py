"""Evaluation audio with transcripts, and the scores fastslm holds its outputs to (WER, cosine).

Product code: the accuracy gates (calibration/gates.py) and the demo model's evaluation
(models/demo/evaluate.py) read their utterances and score their transcripts here; the
exporter's validation and the sensitivity pass compare tensors with the same cosine.

    corpus split   CORPUS/<split>.jsonl, one {"id", "text", "seconds", "path"} per line; a relative
                   path is resolved against the JSONL's folder (or its parent)
    shared data    $FASTSLM_SHARED_DATA, the folder holding jfk.flac. Never guessed: an installed
                   fastslm looks nowhere outside itself, so without the variable there is no jfk.flac
    cosine         of two tensors flattened, in float64; 1.0 when both are all zeros
    WER            Whisper's English normalisation (whisper_normalizer's EnglishTextNormalizer: lower
                   case, punctuation removed, numbers and spellings standardised, so "Forty-two" and
                   "42" match), then corpus-level (S + D + I) / reference words (jiwer), in percent
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.audio import SAMPLE_RATE
from ..runtime.errors import FastSLMError

JFK_FILE = "jfk.flac"
JFK_TRANSCRIPT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


class EvalSetError(FastSLMError):
    """Evaluation data is missing or damaged; the message says what to rebuild or set."""


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str
    seconds: float
    path: Path

    @property
    def samples(self) -> int:
        """Upper bound of the utterance's length in samples (the corpus rounds seconds to 0.01 s)."""
        return int(np.ceil((self.seconds + 0.01) * SAMPLE_RATE))


@dataclass(frozen=True)
class EvalItem:
    """One utterance to transcribe and score: its id, reference transcript and audio file."""

    id: str
    text: str
    audio: Path


def shared_data() -> Path | None:
    """$FASTSLM_SHARED_DATA as a folder, or None when it is not set."""
    value = os.environ.get("FASTSLM_SHARED_DATA")
    return Path(value) if value else None


def jfk_utterance() -> Utterance | None:
    """The shared real recording with its transcript, when $FASTSLM_SHARED_DATA holds it."""
    folder = shared_data()
    if folder is None or not (folder / JFK_FILE).is_file():
        return None
    return Utterance("jfk", JFK_TRANSCRIPT, 11.0, folder / JFK_FILE)


def read_corpus(jsonl: str | Path) -> list[Utterance]:
    """Utterances of one corpus split; relative audio paths are resolved against the JSONL's folder."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise EvalSetError(f"corpus split {jsonl} is missing: build the corpus first (fastslm.models.demo.corpus)")
    out = []
    with jsonl.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Utterance(str(d["id"]), str(d["text"]), float(d["seconds"]), Path(d["path"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise EvalSetError(f"{jsonl}:{n} is not a corpus line ({exc}); rebuild the corpus split") from None
    return [_resolved(u, jsonl.parent) for u in out]


def _resolved(u: Utterance, root: Path) -> Utterance:
    if u.path.is_absolute() or u.path.exists():
        return u
    for base in (root, root.parent):
        if (base / u.path).exists():
            return Utterance(u.id, u.text, u.seconds, base / u.path)
    return Utterance(u.id, u.text, u.seconds, root / u.path)


# ---------------------------------------------------------------------------------------------
# Scoring


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of `a` and `b` flattened (float64); two zero tensors count as equal (1.0)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


@functools.lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return " ".join(_normalizer()(text).split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus-level WER in percent after Whisper's English normalisation.

    Pairs whose reference normalises to nothing are skipped (WER is undefined for them); NaN
    when none is left.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return float("nan")
    refs, hyps = zip(*pairs)
    return 100.0 * jiwer.wer(list(refs), list(hyps))
