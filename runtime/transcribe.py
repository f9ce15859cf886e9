"""Transcribe a recording of any length, segment by segment, in bounded memory.

    AudioReader (10 s blocks) -> Segmenter (VAD, pause cuts, <= 30 s) -> queue of <= `in_flight` segments
    -> per `batch` segments: batch_generate.generate_rows = exactly what transcribing each segment alone gives
    -> Segment(start, end, text) yielded as soon as it is decoded; the spans between segments are `skipped`

Each segment is one 30 s audio-tower window and its own short LLM context (prompt + speech
tokens + answer), so the LLM's cost and the ONNX Runtime arena are those of one window whatever
the length, and the model is asked what it was trained for (one window of speech). A few
segments are decoded together as rows of one batch (ONNX Runtime), which shares each LLM
call's overhead between them. Reading,
VAD and segmentation run in a thread ahead of the model (ONNX Runtime and numpy's FFT release
the GIL), at most `in_flight` finished segments ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .audio_stream import AudioReader, StreamOptions
from .batch_generate import can_batch, generate_rows
from .errors import OptionError
from .sampling import SamplingOptions
from .segmenter import SegmentAudio, Segmenter, SegmentOptions


@dataclass(frozen=True)
class TranscribeOptions:
    segments: SegmentOptions = field(default_factory=SegmentOptions)
    stream: StreamOptions = field(default_factory=StreamOptions)
    sampling: SamplingOptions | None = None  # None: the model's (Pipeline.sampling)
    language: str | None = None
    prompt: str = "transcribe"
    in_flight: int = 2  # segments read ahead of the model: the memory bound is (in_flight + batch) windows
    # Segments whose answers are decoded together (batch_generate): the LLM's cost per step barely
    # grows with the rows. Memory: the rows' KV caches (a few MB) and their windows' samples.
    batch: int = 4

    def __post_init__(self):
        if not isinstance(self.in_flight, int) or not 1 <= self.in_flight <= 64:
            raise OptionError(f"in_flight {self.in_flight!r} is invalid: use 1 to 64 segments")
        if not isinstance(self.batch, int) or not 1 <= self.batch <= 64:
            raise OptionError(f"batch {self.batch!r} is invalid: use 1 to 64 segments")


@dataclass
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class Transcript:
    segments: list[Segment]
    skipped: list[tuple[float, float]]  # (start, end) seconds that held no speech by the VAD
    seconds: float

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)


class Transcriber:
    """Iterate over `segments()` to get each Segment as it is decoded; `transcript()` collects them all."""

    def __init__(self, pipe, source: "str | Path | np.ndarray", options: TranscribeOptions | None = None,
                 sample_rate: int | None = None):
        self.pipe = pipe
        self.options = options or TranscribeOptions()
        self.reader = AudioReader(source, sample_rate, self.options.stream)
        self.segmenter = Segmenter(self.options.segments)
        self.skipped: list[tuple[float, float]] = []
        self.samples_seen = 0  # the header's duration can be off for some formats; this counts what was read
        self.max_in_flight = 0  # the most segments ever waiting for the model (bounded-memory check)
        self.done: list[Segment] = []

    def segments(self) -> Iterator[Segment]:
        last_end = 0
        for batch in self._batches():
            o = self.options
            if len(batch) > 1:
                results = generate_rows(self.pipe, [a.samples for a in batch], o.prompt, o.sampling, o.language)
            else:
                results = [self.pipe.generate(batch[0].samples, o.prompt, sample_rate=SAMPLE_RATE, sampling=o.sampling,
                                              language=o.language)]  # fmt: skip
            for audio, result in zip(batch, results):
                if audio.start > last_end:
                    self.skipped.append((last_end / SAMPLE_RATE, audio.start / SAMPLE_RATE))
                last_end = audio.end
                segment = Segment(audio.start_seconds, audio.end_seconds, result.text, result.token_ids)
                self.done.append(segment)
                yield segment
        if self.samples_seen > last_end:
            self.skipped.append((last_end / SAMPLE_RATE, self.samples_seen / SAMPLE_RATE))

    def _batches(self) -> Iterator[list[SegmentAudio]]:
        size = self.options.batch if can_batch(self.pipe) else 1
        batch: list[SegmentAudio] = []
        for audio in self._segment_audio():
            batch.append(audio)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def transcript(self) -> Transcript:
        """Everything decoded so far; after `segments()` is exhausted, the whole recording."""
        return Transcript(list(self.done), list(self.skipped), self.samples_seen / SAMPLE_RATE)

    # ---- the reading thread ------------------------------------------------------------------

    def _segment_audio(self) -> Iterator[SegmentAudio]:
        ready: queue.Queue = queue.Queue(maxsize=self.options.in_flight)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for audio in self.segmenter.segments(self._counted_blocks()):
                    if not put(audio):
                        return
                put(done)
            except BaseException as exc:  # re-raised in the consumer, which owns error reporting
                put(exc)

        worker = threading.Thread(target=produce, name="fastslm-segmenter", daemon=True)
        worker.start()
        try:
            while True:
                self.max_in_flight = max(self.max_in_flight, ready.qsize())
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def _counted_blocks(self) -> Iterator[np.ndarray]:
        for block in self.reader.blocks():
            self.samples_seen += len(block)
            yield block


def transcribe(pipe, source: "str | Path | np.ndarray", options: TranscribeOptions | None = None,
               sample_rate: int | None = None) -> Transcript:
    transcriber = Transcriber(pipe, source, options, sample_rate)
    for _ in transcriber.segments():
        pass
    return transcriber.transcript()
