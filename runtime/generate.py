"""The FastSLM generate loop, written once for every backend.

audio -> 30 s mel windows -> audio tower (in batches) -> speech tokens
prompt text -> ids split at <|AUDIO|> -> embeddings left + speech tokens + right
prefill -> KV cache -> sample one token at a time -> streamed text pieces
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, WINDOW_SECONDS, audio_to_windows, load_audio, window_count
from .backend import Backend
from .errors import AudioError, OptionError
from .kv_cache import KVCache
from .prompt import build_prompt, resolve_task
from .sampling import Sampler, SamplingOptions
from .tokenizer import StreamDecoder, Tokenizer

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
    text: str
    token_ids: list[int]
    prompt_tokens: int
    n_windows: int
    audio_seconds: float
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Load once, then ask many questions about many recordings.

    >>> pipe = Pipeline.load()                 # the shipped demo model
    >>> pipe.transcribe("meeting.wav")
    >>> for piece in pipe.stream("meeting.wav", "summarize"): print(piece, end="")
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, model_name: str = "fastslm"):
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name

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
        samples = load_audio(audio, sample_rate)
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
        """Raise AudioError when `seconds` of audio + the prompt + the answer overflow the LLM's context."""
        max_context = self.backend.max_context
        per_window = self.backend.tokens_per_window
        speech = window_count(int(round(seconds * SAMPLE_RATE))) * per_window
        text = len(self.prompt_ids(prompt, language))
        if speech + text + max_new_tokens <= max_context:
            return
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
        length = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        raise AudioError(
            f"{source} is {length}: {speech} speech tokens + {text} prompt + {max_new_tokens} answer tokens exceed the "
            f"model's {max_context}-token context; split the audio into parts of at most {room * WINDOW_SECONDS / 60:.0f} min"
        )

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
        """Sample answer tokens after `prefill` until an end token or max_new_tokens."""
        sampler = Sampler(sampling)
        stop = set(self.tokenizer.eos_ids)
        logits, cache = prefill.logits, prefill.cache
        for step in range(sampling.max_new_tokens):
            token = sampler(logits)
            if token in stop:
                return
            yield token
            if step + 1 < sampling.max_new_tokens:
                logits, cache = self.backend.decode(self.backend.embed_tokens(np.array([token], dtype=np.int64)), cache)

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
        sampling = sampling or SamplingOptions()
        speech = self._speech(audio, sample_rate, prompt, language, sampling)
        prefill = self.prefill(speech, prompt, language)
        yield from self.text_pieces(self.decode_tokens(prefill, sampling))

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Answer token ids -> text pieces as soon as they are whole characters (for callers that
        watch the tokens themselves, e.g. to count them or to stop early)."""
        decoder = StreamDecoder(self.tokenizer)
        started = False
        for token in tokens:
            piece = decoder.add(token)
            if not started:  # byte-level BPE words carry their leading space; the answer should not
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail and (started or tail.strip()):
            yield tail if started else tail.lstrip()

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
        t0 = time.perf_counter()
        sampling = sampling or SamplingOptions()
        speech = self._speech(audio, sample_rate, prompt, language, sampling, progress)
        t1 = time.perf_counter()
        prefill = self.prefill(speech, prompt, language)
        t2 = time.perf_counter()
        ids = list(self.decode_tokens(prefill, sampling))
        t3 = time.perf_counter()
        return GenerationResult(
            text=self.tokenizer.decode(ids).strip(),
            token_ids=ids,
            prompt_tokens=prefill.prompt_tokens,
            n_windows=speech.n_windows,
            audio_seconds=speech.seconds,
            timings={"audio_tower_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2},
        )

    def _speech(self, audio, sample_rate, prompt, language, sampling: SamplingOptions, progress=None) -> SpeechTokens:
        """Encode (unless given speech tokens) and make sure prompt + speech + answer fit the context."""
        speech = audio if isinstance(audio, SpeechTokens) else self.encode(audio, sample_rate, progress)
        self.check_context(speech.seconds, prompt, language, sampling.max_new_tokens)
        return speech

    def transcribe(self, audio: "str | Path | np.ndarray", sample_rate: int | None = None) -> str:
        return self.generate(audio, "transcribe", sample_rate=sample_rate).text

