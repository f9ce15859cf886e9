"""Many questions about one recording: its audio prefix is encoded and prefilled once.

FastSLM's prompt is `<|im_start|>user\\n` TASK [LANGUAGE] `<|audio_bos|>` SPEECH `<|audio_eos|>`
`\\n` INSTRUCTION `<|im_end|>\\n<|im_start|>assistant\\n`. The task token (and the optional
language token) come *before* the audio, so the KV cache up to `<|audio_eos|>` is shared by every
question of the same task, not by every question: a session keeps one prefix per (task,
language) and builds each on first use from the speech tokens it keeps (prefill only; the audio
tower never runs twice). A question then costs the prefill of its own few instruction tokens.

Prefixes are prefilled window by window (text left of the audio, then each window's speech
tokens, then `<|audio_eos|>`), the same chunks the streaming session (`streaming`) feeds as
windows complete, so a streamed recording and the same recording opened whole give the same cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .kv_cache import KVCache
from .prompt import AUDIO_EOS, LANGUAGE_TOKENS, Task, build_prompt, language_token, resolve_task
from .sampling import SamplingOptions

if TYPE_CHECKING:
    from .generate import GenerationResult, Pipeline, SpeechTokens

PrefixKey = tuple[Task, "str | None"]  # (task, language code "en"/"ko" or None)


def prefix_key(prompt: str | None, language: str | None) -> PrefixKey:
    task, _ = resolve_task(prompt)
    if language is None:
        return task, None
    token = language_token(language)
    return task, next(code for code, tok in LANGUAGE_TOKENS.items() if tok == token)


def samples_sha256(samples: "np.ndarray | Iterable[np.ndarray]") -> str:
    """The content key of a recording: sha256 of its 16 kHz float32 mono samples (any container, any rate),
    given whole or as consecutive blocks (e.g. `AudioReader.blocks()`, so a long file is never held whole)."""
    import hashlib

    digest = hashlib.sha256()
    for block in [samples] if isinstance(samples, np.ndarray) else samples:
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return digest.hexdigest()


class AudioSession:
    """One recording, encoded once; `ask` it any number of questions.

    >>> session = pipe.open("meeting.wav")
    >>> session.ask("summarize").text
    >>> session.ask("Who spoke first?").timings["time_to_first_token_s"]   # the prefix is reused

    The first answer's timings include the opening (audio tower, or loading a saved cache): that
    is what a user waits for between giving the recording with its question and the first word.
    """

    def __init__(
        self,
        pipe: "Pipeline",
        speech: "SpeechTokens",
        audio_sha256: str | None,
        *,
        file_sha256: str | None = None,
        prefixes: dict[PrefixKey, KVCache] | None = None,
        opened_at: float | None = None,
        opening: dict[str, float] | None = None,
    ):
        self.pipe = pipe
        self.speech = speech
        self.audio_sha256 = audio_sha256  # sha256 of the 16 kHz float32 samples: the content key
        self.file_sha256 = file_sha256  # sha256 of the file's bytes, when opened from a file
        self.prefixes: dict[PrefixKey, KVCache] = dict(prefixes or {})
        self.loaded_prefixes = frozenset(self.prefixes)  # what came from a saved cache
        self.last_result: GenerationResult | None = None
        self._opened_at = opened_at
        self._opening = dict(opening or {})  # timings charged to the first answer

    @property
    def nbytes(self) -> int:
        """Memory it holds: the speech tokens and every prefix's KV cache (a prefix is added per task asked)."""
        return int(self.speech.embeddings.nbytes) + sum(cache.nbytes for cache in list(self.prefixes.values()))

    # ---- the audio prefix ----------------------------------------------------------------------

    def prefix_ids(self, key: PrefixKey) -> tuple[list[int], int]:
        """(ids left of the speech tokens, the <|audio_eos|> id) of a (task, language) prefix."""
        return prefix_ids(self.pipe, *key)

    def prefix(self, key: PrefixKey) -> tuple[KVCache, float]:
        """The KV cache of everything up to <|audio_eos|> for this key, and the seconds spent building it now."""
        if key in self.prefixes:
            return self.prefixes[key], 0.0
        t0 = time.perf_counter()
        left, eos = self.prefix_ids(key)
        builder = PrefixBuilder(self.pipe, left)
        per_window = self.pipe.backend.tokens_per_window
        for start in range(0, len(self.speech.embeddings), per_window):
            builder.add(self.speech.embeddings[start : start + per_window])
        self.prefixes[key] = builder.close(eos)
        return self.prefixes[key], time.perf_counter() - t0

    def fits(self, prompt: str | None, language: str | None, max_new_tokens: int) -> bool:
        """Whether prompt + speech tokens + answer fit the LLM's context in one prefill."""
        ids = self.pipe.prompt_ids(prompt, language)
        return len(self.speech.embeddings) + len(ids) + max_new_tokens <= self.pipe.backend.max_context

    # ---- questions -----------------------------------------------------------------------------

    def ask(self, prompt: str | None = None, *, sampling: SamplingOptions | None = None, language: str | None = None) -> "GenerationResult":
        for _ in self.stream(prompt, sampling=sampling, language=language):
            pass
        assert self.last_result is not None
        return self.last_result

    def stream(
        self, prompt: str | None = None, *, sampling: SamplingOptions | None = None, language: str | None = None
    ) -> Iterator[str]:
        """Yield the answer as text pieces; `last_result` holds the whole result (with timings) afterwards."""
        from .beyond_context import answer_in_parts
        from .generate import GenerationResult, Prefill

        asked = self._opened_at if self._opened_at is not None else time.perf_counter()
        timings = {"audio_tower_s": 0.0, "prefill_s": 0.0, **self._opening}
        self._opened_at, self._opening = None, {}
        sampling = sampling or self.pipe.sampling
        self.last_result = None
        if not self.fits(prompt, language, sampling.max_new_tokens):
            self.last_result = yield from answer_in_parts(self, prompt, language, sampling, asked, timings)
            return

        ids = self.pipe.prompt_ids(prompt, language)
        t0 = time.perf_counter()
        cache, built = self.prefix(prefix_key(prompt, language))
        left, eos = self.prefix_ids(prefix_key(prompt, language))
        if list(ids.left) != left or ids.right[0] != eos:
            raise AssertionError("the prompt's ids before the instruction differ from its task's audio prefix")
        suffix = np.asarray(ids.right[1:], dtype=np.int64)
        logits, cache = self.pipe.backend.decode(self.pipe.backend.embed_tokens(suffix), cache)
        timings["prefill_s"] += time.perf_counter() - t0
        tokens = TimedTokens(self.pipe.decode_tokens(Prefill(cache, logits, cache.length), sampling))
        decode_start = time.perf_counter()
        yield from self.pipe.text_pieces(tokens)
        timings["time_to_first_token_s"] = (tokens.first_at or time.perf_counter()) - asked
        timings["decode_s"] = time.perf_counter() - decode_start
        text, thinking = self.pipe.tokenizer.decode_answer(tokens.ids)
        self.last_result = GenerationResult(
            text=text,
            thinking=thinking,
            token_ids=tokens.ids,
            prompt_tokens=cache.length,
            n_windows=self.speech.n_windows,
            audio_seconds=self.speech.seconds,
            timings=timings,
        )

    # ---- saving ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the speech tokens and prefixes next to the recording (see `prefix_cache`)."""
        from .prefix_cache import save_session

        return save_session(self, Path(path))


class TimedTokens:
    """Passes answer tokens through, keeping them and the moment the first one was chosen."""

    def __init__(self, tokens: Iterator[int]):
        self._tokens = tokens
        self.ids: list[int] = []
        self.first_at: float | None = None

    def __iter__(self) -> Iterator[int]:
        for token in self._tokens:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.ids.append(token)
            yield token


def prefix_ids(pipe: "Pipeline", task: Task, language: str | None) -> tuple[list[int], int]:
    """(ids left of the speech tokens, the <|audio_eos|> id) of a task's prompt: the instruction does not change them."""
    ids = pipe.tokenizer.encode_prompt(build_prompt(task, task.default_instruction or "?", language=language))
    return list(ids.left), pipe.tokenizer.token_id(AUDIO_EOS)


class PrefixBuilder:
    """Prefill an audio prefix in the session's chunks: the text left of the audio, each window, <|audio_eos|>."""

    def __init__(self, pipe: "Pipeline", left_ids: list[int]):
        self.pipe = pipe
        backend = pipe.backend
        _, self.cache = backend.decode(backend.embed_tokens(np.asarray(left_ids, dtype=np.int64)), backend.empty_cache())

    def add(self, window_tokens: np.ndarray) -> None:
        _, self.cache = self.pipe.backend.decode(window_tokens, self.cache)

    def close(self, eos_id: int) -> KVCache:
        _, cache = self.pipe.backend.decode(self.pipe.backend.embed_tokens(np.array([eos_id], dtype=np.int64)), self.cache)
        return cache

