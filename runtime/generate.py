"""The FastSLM generate loop, written once for every backend.

audio -> 30 s mel windows -> audio tower (in batches) -> speech tokens
prompt text -> ids split at <|AUDIO|> -> embeddings left + speech tokens + right
prefill -> KV cache -> sample one token at a time -> streamed text pieces
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, WINDOW_SECONDS, audio_to_windows, load_audio, window_count
from .audio_stream import AudioReader
from .backend import Backend
from .beam_search import beam_search
from .beyond_context import duration_text
from .bundle import sha256_file
from .errors import AudioError, OptionError
from .kv_cache import KVCache
from .prompt import Task, build_prompt, resolve_task
from .repetition import ends_in_loop
from .sampling import Sampler, SamplingOptions
from .session import AudioSession, samples_sha256
from .tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from .streaming import StreamingSession

ProgressCallback = Callable[[int, int], None]  # (windows done, windows total)


@dataclass
class SpeechTokens:
    """The audio tower's output for one recording: (n_windows * tokens_per_window, hidden)."""

    embeddings: np.ndarray
    n_windows: int
    seconds: float


@dataclass
class Prefill:
    """The LLM state right after the prompt: ready to sample the first answer token."""

    cache: KVCache
    logits: np.ndarray  # (vocab,) for the next position
    prompt_tokens: int  # positions in the cache (text + speech tokens)


@dataclass
class GenerationResult:
    text: str  # the answer (a leading <think> block is in `thinking`, see Tokenizer.split_thinking)
    token_ids: list[int]
    prompt_tokens: int
    n_windows: int
    audio_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    strategy: str | None = None  # set when the recording was past the context and answered in parts
    parts: list[dict] = field(default_factory=list)  # those parts: start, end (s) and each part's answer
    thinking: str = ""  # what the model reasoned before answering, when it opened with <think>


class Pipeline:
    """Load once, then ask many questions about many recordings.

    >>> pipe = Pipeline.load()                 # the shipped demo model
    >>> pipe.transcribe("meeting.wav")
    >>> for piece in pipe.stream("meeting.wav", "summarize"): print(piece, end="")
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        *,
        model_name: str = "fastslm",
        identity: "str | Callable[[], str] | None" = None,
        sampling: SamplingOptions | None = None,
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._identity = identity
        # How to decode when a call passes no SamplingOptions: the model's recommendation
        # (SamplingOptions.from_config), greedy when it has none.
        self.sampling = sampling or SamplingOptions()

    @property
    def identity(self) -> str | None:
        """What a saved audio-prefix cache is keyed by besides the audio: these exact weights and tokenizer.

        None for a pipeline built by hand (its caches cannot be saved); computed on first use.
        """
        if callable(self._identity):
            self._identity = self._identity()
        return self._identity

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "auto", precision: str = "auto",
             **backend_options) -> "Pipeline":
        from .loading import load_pipeline

        return load_pipeline(model, backend, precision, **backend_options)

    @property
    def variant(self) -> str:
        """Backend and precision, e.g. "onnx int8", as the banner names them."""
        bundle = getattr(self.backend, "bundle", None)
        precision = bundle.precision if bundle is not None else getattr(self.backend, "precision", "")
        if bundle is not None and bundle.manifest.get("target") == "onnx-fp16w":
            precision += " from fp16 weights"  # computes in fp32; the file stores fp16
        return f"{self.backend.name} {precision}".strip()

    def close(self) -> None:
        """Release the backend (TensorRT: save its compiled-kernel cache, free device memory)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- stage 1: audio tower ------------------------------------------------------------

    def encode(
        self,
        audio: "str | Path | np.ndarray",
        sample_rate: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> SpeechTokens:
        return self.encode_samples(load_audio(audio, sample_rate), progress)

    def encode_samples(self, samples: np.ndarray, progress: ProgressCallback | None = None) -> SpeechTokens:
        """16 kHz float32 mono samples (load_audio's output) -> speech tokens."""
        windows = audio_to_windows(samples, n_mels=self.backend.n_mels)  # (W, n_mels, 3000)
        batch = max(1, self.backend.max_windows_per_batch)
        parts = []
        for start in range(0, len(windows), batch):
            parts.append(self.backend.encode_windows(windows[start : start + batch]))
            if progress is not None:
                progress(min(start + batch, len(windows)), len(windows))
        tokens = np.concatenate(parts, axis=0)  # (W, Q, H)
        return SpeechTokens(tokens.reshape(-1, tokens.shape[-1]), len(windows), len(samples) / SAMPLE_RATE)

    # ---- the context budget ------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None, language: str | None = None):
        task, instruction = resolve_task(prompt)
        return self.tokenizer.encode_prompt(build_prompt(task, instruction, language=language))

    def check_context(
        self, seconds: float, prompt: str | None, language: str | None, max_new_tokens: int, source: str = "the audio"
    ) -> None:
        """Raise AudioError when `seconds` of audio + the prompt + the answer overflow the LLM's context
        (for callers that prefill in one go, like `prefill`; sessions answer past it in parts instead)."""
        if not self.check_answerable(seconds, prompt, language, max_new_tokens, source):
            max_context, per_window = self.backend.max_context, self.backend.tokens_per_window
            speech = window_count(int(round(seconds * SAMPLE_RATE))) * per_window
            text = len(self.prompt_ids(prompt, language))
            room = (max_context - text - max_new_tokens) // per_window  # whole windows that still fit
            raise AudioError(
                f"{source} is {duration_text(seconds)}: {speech} speech tokens + {text} prompt + {max_new_tokens} answer "
                f"tokens exceed the model's {max_context}-token context; split the audio into parts of at most "
                f"{room * WINDOW_SECONDS / 60:.0f} min"
            )

    def check_answerable(
        self, seconds: float, prompt: str | None, language: str | None, max_new_tokens: int, source: str = "the audio"
    ) -> bool:
        """Whether `seconds` of audio + the prompt + the answer fit the LLM's context in one prefill.

        Past the context a session answers in parts (`beyond_context`), at any length; this raises only
        when the prompt and the answer leave no room for audio.
        """
        max_context = self.backend.max_context
        per_window = self.backend.tokens_per_window
        speech = window_count(int(round(seconds * SAMPLE_RATE))) * per_window
        text = len(self.prompt_ids(prompt, language))
        if speech + text + max_new_tokens <= max_context:
            return True
        room = (max_context - text - max_new_tokens) // per_window  # whole windows that still fit
        if room < 1 and text + per_window + 1 > max_context:  # not even a one-token answer fits: the prompt's fault
            raise OptionError(
                f"the prompt is {text} tokens: with one 30 s window of audio ({per_window} tokens) it overflows the "
                f"model's {max_context}-token context; shorten the prompt"
            )
        if room < 1:
            raise OptionError(
                f"max_new_tokens {max_new_tokens} with the {text}-token prompt leaves no room for audio in the model's "
                f"{max_context}-token context; lower it to at most {max_context - text - per_window}"
            )
        return False

    # ---- stage 2: LLM ---------------------------------------------------------------------

    def prefill(self, speech: SpeechTokens, prompt: str | None = None, language: str | None = None) -> Prefill:
        ids = self.prompt_ids(prompt, language)
        embed = self.backend.embed_tokens
        embeds = np.concatenate(
            [embed(np.asarray(ids.left, dtype=np.int64)), speech.embeddings, embed(np.asarray(ids.right, dtype=np.int64))]
        )  # (T_left + N_speech + T_right, H)
        logits, cache = self.backend.decode(embeds, self.backend.empty_cache())
        return Prefill(cache, logits, cache.length)

    def decode_tokens(self, prefill: Prefill, sampling: SamplingOptions) -> Iterator[int]:
        """Sample answer tokens after `prefill` until an end token, a loop (repetition.py) or max_new_tokens.

        With `sampling.beam_size` > 1 the tokens come all at once, after the search (beam_search.py)."""
        stop = set(self.tokenizer.eos_ids)
        logits, cache = prefill.logits, prefill.cache
        if sampling.beam_size > 1:
            yield from beam_search(self.backend, logits, cache, sampling.beam_size, sampling.max_new_tokens, stop,
                                   sampling.stop_loops)
            return
        sampler = Sampler(sampling)
        answer: list[int] = []
        for step in range(sampling.max_new_tokens):
            token = sampler(logits)
            if token in stop:
                return
            yield token
            answer.append(token)
            # streamed tokens cannot be taken back: a loop just ends here
            if sampling.stop_loops and ends_in_loop(answer):
                return
            if step + 1 < sampling.max_new_tokens:
                logits, cache = self.backend.decode(self.backend.embed_tokens(np.array([token], dtype=np.int64)), cache)

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Answer tokens -> text pieces as soon as they decode (their join equals the decoded answer up to
        trailing whitespace). A <think> block that opens the reply is held back and left out once its
        </think> arrives; one that never closes is the answer after all (Tokenizer.split_thinking)."""
        decoder = StreamDecoder(self.tokenizer)
        started = False
        thinking: list[int] | None = None  # ids of an open <think> block, held back

        def pieces(ids: Iterable[int]) -> Iterator[str]:
            nonlocal started
            for token in ids:
                piece = decoder.add(token)
                if not started:  # byte-level BPE words carry their leading space; the answer should not
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece

        think = self.tokenizer.think_ids
        for i, token in enumerate(tokens):
            if thinking is not None:
                thinking.append(token)
                if token == think[1]:
                    thinking = None
                continue
            if i == 0 and think is not None and token == think[0]:
                thinking = [token]
                continue
            yield from pieces((token,))
        if thinking is not None:
            yield from pieces(thinking)
        tail = decoder.flush()
        if tail and (started or tail.strip()):
            yield tail if started else tail.lstrip()

    # ---- sessions: many questions, one encoding --------------------------------------------

    def open(
        self,
        audio: "str | Path | np.ndarray | SpeechTokens",
        sample_rate: int | None = None,
        *,
        cache: "str | Path | None" = None,
        progress: ProgressCallback | None = None,
    ) -> AudioSession:
        """Encode a recording once and return a session to `ask` it any number of questions.

        With `cache` (a file path, e.g. `prefix_cache.cache_path_for(recording)`), a cache saved there for
        this audio and this model is loaded instead of running the audio tower; a cache for other audio
        or another model raises CacheFileError. A missing file just means "encode"; save with `session.save`.
        """
        t0 = time.perf_counter()
        if isinstance(audio, SpeechTokens):
            return AudioSession(self, audio, None, opened_at=t0)
        from .streaming import open_recording

        # A file's bytes hash lets a saved cache be trusted without decoding the audio at all.
        file_key = sha256_file(Path(audio)) if isinstance(audio, (str, Path)) and Path(audio).is_file() else None
        if cache is not None and Path(cache).exists():
            from .prefix_cache import load_session

            session = load_session(self, Path(cache), file_key, lambda: samples_sha256(AudioReader(audio, sample_rate).blocks()))
            session._opened_at = t0
            session._opening = {"cache_load_s": time.perf_counter() - t0}
            return session
        # Read in bounded blocks, never whole: an hour-long file costs its speech tokens, not its samples.
        return open_recording(self, audio, sample_rate, progress, file_sha256=file_key, opened_at=t0)

    def open_stream(self, prepare: "Sequence[Task | str | None]" = (Task.SQQA,), language: str | None = None, **options) -> "StreamingSession":
        """A recording still being made: `feed` it PCM chunks, `finish` it for an AudioSession.

        `prepare`: prompts (or just their kind: "transcribe", "summarize", any question) whose audio prefix is
        prefilled window by window while recording; other tasks are prefilled from the kept speech tokens
        when first asked. `options`: sample_rate, reserve_tokens (see StreamingSession).
        """
        from .streaming import StreamingSession

        return StreamingSession(self, prepare=prepare, language=language, **options)

    # ---- one-call API ---------------------------------------------------------------------

    def stream(
        self,
        audio: "str | Path | np.ndarray | SpeechTokens",
        prompt: str | None = None,
        *,
        sample_rate: int | None = None,
        sampling: SamplingOptions | None = None,
        language: str | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text pieces while it is being decoded (their join equals generate's text
        up to trailing whitespace)."""
        yield from self.open(audio, sample_rate).stream(prompt, sampling=sampling, language=language)

    def generate(
        self,
        audio: "str | Path | np.ndarray | SpeechTokens",
        prompt: str | None = None,
        *,
        sample_rate: int | None = None,
        sampling: SamplingOptions | None = None,
        language: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        session = self.open(audio, sample_rate, progress=progress)
        return session.ask(prompt, sampling=sampling, language=language)

    def transcribe(self, audio: "str | Path | np.ndarray", sample_rate: int | None = None) -> str:
        return self.generate(audio, "transcribe", sample_rate=sample_rate).text
