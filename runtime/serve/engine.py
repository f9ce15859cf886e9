"""The server's generation side: worker threads, a bounded queue, and the shared audio-prefix cache.

    HTTP handler --submit()--> [queue: at most queue_size waiting] --> worker thread(s)
         ^                                                                   |
         +------ text pieces, then one Answer (asyncio queue, thread-safe) <-+

A question's audio goes through the audio tower once: its session (runtime.session: the speech
tokens and the KV cache of the audio prefix) is kept, keyed by the upload's sha256, so the next
question about the same recording, from any client, skips its encoding and its audio prefill. Transcription runs segment by segment (runtime.transcribe), as `fastslm-run` does. A
job that its client gave up on is cancelled: skipped if still waiting, stopped between windows
while encoding, between tokens while answering and between segments while transcribing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..audio import SAMPLE_RATE
from ..errors import FastSLMError
from ..generate import Pipeline
from ..session import AudioSession
from ..prompt import Task, resolve_task
from ..sampling import SamplingOptions
from ..transcribe import Transcriber, TranscribeOptions, Transcript
from .api_errors import ApiError, bad_request, queue_full
from .options import ServeOptions
from .uploads import Upload


@dataclass(frozen=True)
class Question:
    upload: Upload
    prompt: str  # "transcribe", "summarize" or a question (runtime.prompt.resolve_task)
    sampling: SamplingOptions
    language: str | None = None


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token), "length" (max tokens) or "cancelled"
    audio_seconds: float
    audio_cached: bool  # the recording's session (speech tokens, audio prefix) came from the cache
    transcript: Transcript | None = None  # transcription only: its segments and skipped spans
    timings: dict[str, float] = field(default_factory=dict)


class Cancelled(Exception):
    """Raised inside a worker when the job's client has gone."""


class Job:
    """One request in flight: the worker pushes pieces, the handler reads them."""

    def __init__(self, question: Question, loop: asyncio.AbstractEventLoop):
        self.question = question
        self.cancelled = threading.Event()
        self.answer: Answer | None = None
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.done = False

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, piece: str) -> None:
        """Called by the worker thread for each decoded text piece."""
        self._put("piece", piece)

    def _put(self, kind: str, value: object) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces as decoded; afterwards `answer` holds the totals. Raises the
        job's error (ApiError for the client's fault, anything else is a server bug)."""
        while True:
            kind, value = await self._events.get()
            if kind == "piece":
                yield value
            elif kind == "answer":
                self.answer, self.done = value, True
                return
            else:
                self.done = True
                raise value

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])


@dataclass
class CachedSession:
    session: AudioSession  # the recording's speech tokens and its audio-prefix KV cache per task
    lock: threading.Lock
    nbytes: int = 0  # its size when last counted (it grows by a prefix for each new task asked)


class PrefixCache:
    """Least-recently-used audio sessions by upload sha256, bounded by the bytes they hold (thread-safe).

    Bytes, not entries: a session of an 11 s clip on the demo model is under 1 MB, one of a long
    recording on a 4B model hundreds. A session larger than the whole bound is not kept.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, CachedSession] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedSession | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, entry: CachedSession) -> None:
        """Keep `entry`, dropping the least recently used sessions past the bound."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._keep(key, entry)

    def recount(self, key: str, entry: CachedSession) -> None:
        """Count `entry` again after a question (a new task adds its prefix), if it is still kept."""
        with self._lock:
            if self._items.get(key) is not entry:
                return
            del self._items[key]
            self.nbytes -= entry.nbytes
            self._keep(key, entry)

    def _keep(self, key: str, entry: CachedSession) -> None:
        entry.nbytes = entry.session.nbytes
        if entry.nbytes > self.max_bytes:
            return
        self._items[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes


class Engine:
    """Owns the Pipeline for the server's lifetime; `submit` is called from the event loop."""

    def __init__(self, pipe: Pipeline, options: ServeOptions):
        self.pipe = pipe
        self.options = options
        self.cache = PrefixCache(options.prefix_cache_bytes)
        self.stats = {"running": 0, "completed": 0, "cancelled": 0, "failed": 0, "audio_encoded": 0,
                      "prefix_cache_hits": 0}  # fmt: skip
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=options.queue_size)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.options.workers):
            thread = threading.Thread(target=self._work, name=f"fastslm-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def check_room(self) -> None:
        """429 before an upload is decoded when the queue is already full (submit checks again)."""
        if self._queue.full():
            raise queue_full(self.options.queue_size)

    def submit(self, question: Question) -> Job:
        """Queue a question; ApiError 429 when the queue is full. Any length is answered: transcription
        segment by segment, a question past the model's context in parts (runtime.beyond_context)."""
        job = Job(question, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise queue_full(self.options.queue_size) from None
        return job

    def _count(self, name: str, step: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += step

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._count("running")
            try:
                answer = self.answer(job.question, job.emit, job.cancelled)
            except Cancelled:
                self._count("cancelled")
                job._put("error", ApiError(499, "the client closed the request", code="cancelled"))
            except FastSLMError as exc:
                self._count("failed")
                job._put("error", bad_request(str(exc)))
            except Exception as exc:  # a bug: the client gets a 500, the server keeps serving
                self._count("failed")
                job._put("error", exc)
            else:
                self._count("cancelled" if answer.finish_reason == "cancelled" else "completed")
                job._put("answer", answer)
            finally:
                self._count("running", -1)

    def answer(self, question: Question, emit: Callable[[str], None], cancelled: threading.Event) -> Answer:
        """Run one question to the end (or until `cancelled`), calling `emit` with each text piece.

        Transcription goes segment by segment as `fastslm-run` does (runtime.transcribe: any
        length, one piece per segment); any other prompt is asked of the recording's session
        (cached across requests), streamed token by token.
        """
        if cancelled.is_set():
            raise Cancelled
        if resolve_task(question.prompt)[0] == Task.ASR:
            return self._transcribe(question, emit, cancelled)
        return self._ask(question, emit, cancelled)

    def _transcribe(self, question: Question, emit: Callable[[str], None], cancelled: threading.Event) -> Answer:
        t0 = time.perf_counter()
        options = TranscribeOptions(sampling=question.sampling, language=question.language, prompt=question.prompt)
        transcriber = Transcriber(self.pipe, question.upload.samples, options, sample_rate=SAMPLE_RATE)
        stopped, shown = False, 0
        for segment in transcriber.segments():
            if segment.text:  # the pieces join to Transcript.text: segment texts with one space between
                emit(segment.text if shown == 0 else " " + segment.text)
                shown += 1
            if cancelled.is_set():
                stopped = True
                break
        transcript = transcriber.transcript()
        tokens = sum(len(s.token_ids) for s in transcript.segments)
        cut = any(len(s.token_ids) >= question.sampling.max_new_tokens for s in transcript.segments)
        reason = "cancelled" if stopped else "length" if cut else "stop"
        return Answer(
            text=transcript.text, prompt_tokens=0, completion_tokens=tokens, finish_reason=reason,
            audio_seconds=question.upload.seconds, audio_cached=False, transcript=transcript,
            timings={"transcribe_s": time.perf_counter() - t0},
        )  # fmt: skip

    def _ask(self, question: Question, emit: Callable[[str], None], cancelled: threading.Event) -> Answer:
        t0 = time.perf_counter()
        entry, cached = self._session(question.upload, cancelled)
        t1 = time.perf_counter()
        with entry.lock:  # a session keeps its prefixes and last result: one question at a time
            session = entry.session
            pieces = session.stream(question.prompt, sampling=question.sampling, language=question.language)
            text, stopped = [], False
            for piece in pieces:
                text.append(piece)
                emit(piece)
                if cancelled.is_set():  # stop between tokens: no more decode steps
                    stopped = True
                    pieces.close()
                    break
            result = session.last_result
            self.cache.recount(question.upload.sha256, entry)
        if stopped or result is None:
            return Answer(text="".join(text).strip(), prompt_tokens=0, completion_tokens=0, finish_reason="cancelled",
                          audio_seconds=question.upload.seconds, audio_cached=cached)  # fmt: skip
        limit = question.sampling.max_new_tokens
        return Answer(
            text=result.text, prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids),
            finish_reason="length" if len(result.token_ids) >= limit else "stop",
            audio_seconds=question.upload.seconds, audio_cached=cached,
            timings={"open_s": t1 - t0, **result.timings},
        )  # fmt: skip

    def _session(self, upload: Upload, cancelled: threading.Event) -> tuple[CachedSession, bool]:
        entry = self.cache.get(upload.sha256)
        if entry is not None:
            self._count("prefix_cache_hits")
            return entry, True

        def progress(done: int, total: int) -> None:
            if cancelled.is_set():  # stop between audio-tower batches
                raise Cancelled

        session = self.pipe.open(upload.samples, SAMPLE_RATE, progress=progress)
        self._count("audio_encoded")
        entry = CachedSession(session, threading.Lock())
        self.cache.put(upload.sha256, entry)
        return entry, False


