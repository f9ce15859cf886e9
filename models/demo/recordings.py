"""Long test recordings with a reference transcript: held-out clips joined by pauses.

The demo model's held-out utterances (the shipped eval subset, eval_seen then eval_unseen) and
jfk.flac are laid end to end, cycling through them until the requested length, with a pause
of `pause_seconds` (uniform, seeded) between clips and a quiet noise floor everywhere, so a
voice-activity detector meets room-like silence rather than digital zeros. Every clip's place
is recorded, so tests know where speech is and benchmarks have a reference text (WER).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...runtime.audio import SAMPLE_RATE, load_audio
from .evaluate import EVAL_SUBSET, load_split


@dataclass(frozen=True)
class RecordingOptions:
    seconds: float = 60.0
    pause_seconds: tuple[float, float] = (0.3, 1.5)
    noise_db: float = -60.0  # noise floor, dB full scale (RMS)
    seed: int = 0
    long_pauses: tuple[float, ...] = ()  # extra silences (seconds) put after the first clips, one each


@dataclass
class Recording:
    samples: np.ndarray = field(repr=False)  # float32 16 kHz mono
    texts: list[str]  # the clips' reference transcripts, in order
    clip_ids: list[str]
    spans: list[tuple[int, int]]  # each clip's [start, end) in samples

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def text(self) -> str:
        return " ".join(self.texts)


def held_out_clips(include_jfk: bool = True) -> list[tuple[str, str, np.ndarray]]:
    """(id, text, samples) of the shipped eval subset (+ jfk.flac): utterances never trained on."""
    items = load_split("eval_seen", EVAL_SUBSET) + load_split("eval_unseen", EVAL_SUBSET)
    if include_jfk:
        items += load_split("jfk", EVAL_SUBSET)
    return [(it.id, it.text, load_audio(it.audio)) for it in items]


def compose(options: RecordingOptions, clips: list[tuple[str, str, np.ndarray]] | None = None) -> Recording:
    clips = clips if clips is not None else held_out_clips()
    rng = np.random.default_rng(options.seed)
    target = int(options.seconds * SAMPLE_RATE)
    parts, texts, ids, spans = [], [], [], []
    pos, i = 0, 0
    long_pauses = list(options.long_pauses)
    while pos < target:
        clip_id, text, audio = clips[i % len(clips)]
        if pos + len(audio) > target and parts:
            break
        parts.append(audio)
        spans.append((pos, pos + len(audio)))
        texts.append(text)
        ids.append(clip_id)
        pos += len(audio)
        pause = long_pauses.pop(0) if long_pauses else rng.uniform(*options.pause_seconds)
        gap = int(pause * SAMPLE_RATE)
        parts.append(np.zeros(gap, np.float32))
        pos += gap
        i += 1
    samples = np.concatenate(parts)
    noise = rng.standard_normal(len(samples)).astype(np.float32) * np.float32(10 ** (options.noise_db / 20))
    return Recording((samples + noise).astype(np.float32), texts, ids, spans)
