"""Pause-cut segmentation: cut a stream of 16 kHz audio into <= 30 s segments at the speaker's pauses.

    blocks --SpeechDetector--> p(speech) per 32 ms frame
           --hysteresis------> speech spans  [start, end) in frames (pauses >= min_silence end them)
           --packing---------> segments: consecutive spans while the segment fits one 30 s window,
                               each cut at a pause, padded a little on both sides
           --------------->    SegmentAudio(start, end, samples); what lies between segments is skipped

Packing spans up to a window is what the model was trained on (docs/DEMO_MODEL.md: windows of
10-30 s composed of utterances with 0.1-0.8 s pauses) and what makes long audio cheap: the audio
tower costs the same for 3 s as for 30 s. A span longer than a window (speech without a pause)
is cut at its least speech-like frame in the window's second half.

Memory: the segmenter holds the samples of the open segment plus one block, never more than
`max_buffer_samples` (checked on every push), so an hour costs what 30 s costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE, WINDOW_SECONDS
from .errors import OptionError
from .vad import FRAME_SAMPLES, SpeechDetector


@dataclass(frozen=True)
class SegmentOptions:
    threshold: float = 0.5  # speech starts at p >= threshold (Silero's default)
    neg_threshold: float | None = None  # speech ends below this; default threshold - 0.15, as Silero's own utility
    min_silence_seconds: float = 0.1  # a pause this long ends a span; the demo training data has pauses >= 0.1 s
    min_speech_seconds: float = 0.25  # shorter bursts are clicks, not words
    pad_seconds: float = 0.2  # audio kept either side of speech: onsets and final consonants are quiet
    max_pause_seconds: float = 2.0  # a longer pause ends the segment (and is skipped) even if more would fit
    max_seconds: float = float(WINDOW_SECONDS)  # one audio-tower window

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise OptionError(f"VAD threshold {self.threshold!r} is invalid: use a probability between 0 and 1")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise OptionError(f"VAD neg_threshold {self.neg_threshold!r} must lie between 0 and threshold {self.threshold}")
        if not 1.0 <= self.max_seconds <= WINDOW_SECONDS:
            raise OptionError(f"segment length {self.max_seconds!r} s is invalid: use 1 to {WINDOW_SECONDS} s (one window)")
        for name in ("min_silence_seconds", "min_speech_seconds", "pad_seconds", "max_pause_seconds"):
            if not 0.0 <= getattr(self, name) <= 5.0:
                raise OptionError(f"{name} {getattr(self, name)!r} is invalid: use 0 to 5 seconds")
        if 2 * self.pad_seconds >= self.max_seconds:
            raise OptionError(f"pad_seconds {self.pad_seconds} leaves no room in a {self.max_seconds} s segment")

    @property
    def low(self) -> float:
        return self.threshold - 0.15 if self.neg_threshold is None else self.neg_threshold


@dataclass
class SegmentAudio:
    """One segment: samples [start, end) of the 16 kHz recording."""

    start: int
    end: int
    samples: np.ndarray = field(repr=False)

    @property
    def start_seconds(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end / SAMPLE_RATE


def _frames(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE / FRAME_SAMPLES))


class Segmenter:
    """Push 16 kHz blocks in order, get finished segments back; `finish()` flushes the last one."""

    def __init__(self, options: SegmentOptions | None = None, detector: SpeechDetector | None = None):
        self.options = o = options or SegmentOptions()
        self.detector = detector or SpeechDetector()
        self._pad = int(round(o.pad_seconds * SAMPLE_RATE))
        # Spans are packed within max - 2 pads so the padded segment still fits one window.
        self._max_frames = int((o.max_seconds * SAMPLE_RATE - 2 * self._pad) // FRAME_SAMPLES)
        self._min_silence = max(1, _frames(o.min_silence_seconds))
        self._min_speech = _frames(o.min_speech_seconds)
        self._max_pause = _frames(o.max_pause_seconds)
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # sample index of _buffer[0]
        self._frame = 0  # frames scored so far
        self._in_speech = False
        self._span_start = 0
        self._silence_start: int | None = None
        self._seg: list[int] | None = None  # [first span start, last span end] in frames, or None
        self._probs: list[float] = []  # p(speech) of frames from the open segment's start (for forced cuts)
        self._probs_start = 0
        self._last_end = 0  # sample where the previous segment ended: segments never overlap
        self.max_buffer_samples = 0  # the most samples ever held (bounded-memory check)

    # ---- input ---------------------------------------------------------------------------

    def push(self, block: np.ndarray, last: bool = False) -> list[SegmentAudio]:
        block = np.asarray(block, np.float32)
        self._buffer = np.concatenate([self._buffer, block]) if len(self._buffer) else block
        self.max_buffer_samples = max(self.max_buffer_samples, len(self._buffer))
        out: list[SegmentAudio] = []
        for p in self.detector(block, last=last):
            out.extend(self._step(float(p)))
        if last:
            out.extend(self.finish())
        else:
            self._trim()
        return out

    def finish(self) -> list[SegmentAudio]:
        out = []
        if self._in_speech:
            self._end_span(self._silence_start if self._silence_start is not None else self._frame, out)
            self._in_speech = False
        if self._seg is not None:
            out.append(self._emit(*self._seg))
        return out

    def segments(self, blocks: Iterable[np.ndarray]) -> Iterator[SegmentAudio]:
        """All segments of a stream of blocks, each as soon as it is known."""
        previous = None
        for block in blocks:
            if previous is not None:
                yield from self.push(previous)
            previous = block
        if previous is not None:
            yield from self.push(previous, last=True)

    # ---- frame-level state machine ---------------------------------------------------------

    def _step(self, p: float) -> list[SegmentAudio]:
        out: list[SegmentAudio] = []
        i = self._frame
        self._frame += 1
        if self._seg is not None or self._in_speech:
            self._probs.append(p)
        if not self._in_speech:
            if p >= self.options.threshold:
                self._in_speech, self._span_start, self._silence_start = True, i, None
                if self._seg is None:
                    self._probs, self._probs_start = [p], i
        elif p < self.options.low:
            if self._silence_start is None:
                self._silence_start = i
            elif i + 1 - self._silence_start >= self._min_silence:
                self._end_span(self._silence_start, out)
                self._in_speech, self._silence_start = False, None
        elif p >= self.options.threshold:
            self._silence_start = None
        self._cut_if_full(out)
        return out

    def _end_span(self, end: int, out: list[SegmentAudio]) -> None:
        start = self._span_start
        if end - start < self._min_speech:
            if self._seg is None:
                self._probs = []
            return
        if self._seg is None:
            self._seg = [start, end]
        elif end - self._seg[0] <= self._max_frames and start - self._seg[1] <= self._max_pause:
            self._seg[1] = end
        else:
            out.append(self._emit(*self._seg))
            self._seg = [start, end]
            self._restart_probs(start)

    def _cut_if_full(self, out: list[SegmentAudio]) -> None:
        """Emit the open segment once nothing more can join it; cut a too-long span at its least speech-like frame."""
        first = self._seg[0] if self._seg is not None else (self._span_start if self._in_speech else None)
        if first is None:
            return
        paused = self._seg is not None and not self._in_speech and self._frame - self._seg[1] > self._max_pause
        if self._frame - first <= self._max_frames and not paused:
            return
        if self._seg is not None and (not self._in_speech or self._span_start >= self._seg[1]):
            out.append(self._emit(*self._seg))  # the open span (if any) starts after it and begins the next segment
            self._seg = None
            if self._in_speech:
                self._restart_probs(self._span_start)
            else:
                self._probs = []
            return
        # One span of speech longer than a window: cut in the window's second half where speech is least likely.
        start = self._seg[0] if self._seg is not None else self._span_start
        lo, hi = start + self._max_frames // 2, start + self._max_frames
        probs = np.asarray(self._probs[lo - self._probs_start : hi - self._probs_start])
        cut = lo + int(np.argmin(probs))
        out.append(self._emit(start, cut))
        self._seg = None
        self._span_start = cut
        self._restart_probs(cut)

    def _restart_probs(self, frame: int) -> None:
        self._probs = self._probs[frame - self._probs_start :]
        self._probs_start = frame

    # ---- samples ---------------------------------------------------------------------------

    def _emit(self, first: int, end: int) -> SegmentAudio:
        start = max(first * FRAME_SAMPLES - self._pad, self._last_end, self._buffer_start)
        stop = min(end * FRAME_SAMPLES + self._pad, self._buffer_start + len(self._buffer))
        stop = min(stop, start + int(self.options.max_seconds * SAMPLE_RATE))
        samples = self._buffer[start - self._buffer_start : stop - self._buffer_start].copy()
        self._last_end = stop
        return SegmentAudio(start, stop, samples)

    def _trim(self) -> None:
        """Drop samples no future segment can contain."""
        if self._seg is not None:
            keep = self._seg[0] * FRAME_SAMPLES - self._pad
        elif self._in_speech:
            keep = self._span_start * FRAME_SAMPLES - self._pad
        else:
            # A span may still start at any frame from here on (or began up to min_silence ago); keep its pad.
            keep = (self._frame - self._min_silence) * FRAME_SAMPLES - self._pad
        keep = max(keep, self._last_end, self._buffer_start)
        drop = keep - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start = keep
