"""Answer one prompt about several short recordings at once: one LLM call per step for all of them.

Used by `Transcriber` for pause-cut segments (each <= one 30 s window). Every segment's prompt
has the same length (prompt text + one window of speech tokens), so the rows of a batch stay
equally long from prefill to the last step and the LLM graph needs no padding mask. The
prefill runs in the same chunks a session uses for one recording (text left of the audio,
the window, `<|audio_eos|>`, the instruction; `session.PrefixBuilder`), and each row has its
own Sampler seeded as a lone call would be, so each row gets exactly the tokens
`Pipeline.generate` gives that segment alone. Finished rows leave the batch, so a long answer
does not make the others pay for steps they do not need.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, audio_to_windows, load_audio
from .kv_cache import KVCache
from .repetition import ends_in_loop
from .sampling import Sampler, SamplingOptions
from .session import prefix_ids, prefix_key

if TYPE_CHECKING:
    from .generate import GenerationResult, Pipeline


def can_batch(pipe: "Pipeline") -> bool:
    """Whether the backend decodes several equally long rows per call (ONNX Runtime does)."""
    return callable(getattr(pipe.backend, "decode_rows", None))


def generate_rows(
    pipe: "Pipeline",
    recordings: Sequence[np.ndarray],
    prompt: str | None,
    sampling: SamplingOptions | None = None,
    language: str | None = None,
) -> list["GenerationResult"]:
    """The answers `pipe.generate(r, prompt, sample_rate=16000, ...)` gives each 16 kHz recording, at once.

    Recordings longer than one window go through `pipe.generate` alone (rows must be equally long), and so
    does every recording of a beam search.
    """
    from .generate import GenerationResult

    sampling = sampling or pipe.sampling
    backend = pipe.backend
    samples = [load_audio(r, SAMPLE_RATE) for r in recordings]
    windows = [audio_to_windows(s, n_mels=backend.n_mels) for s in samples]
    # a beam search keeps its own rows per recording (beam_search.py), so each recording goes alone
    rows = [i for i, w in enumerate(windows) if len(w) == 1] if sampling.beam_size == 1 else []
    results: dict[int, GenerationResult] = {}
    for i in set(range(len(samples))) - set(rows):
        results[i] = pipe.generate(samples[i], prompt, sample_rate=SAMPLE_RATE, sampling=sampling, language=language)
    if not rows:
        return [results[i] for i in range(len(samples))]
    ids = pipe.prompt_ids(prompt, language)
    if backend.tokens_per_window + len(ids) + sampling.max_new_tokens > backend.max_context:
        # The answer alone would overflow the context: a session answers that in parts (AudioSession.fits).
        for i in rows:
            results[i] = pipe.generate(samples[i], prompt, sample_rate=SAMPLE_RATE, sampling=sampling, language=language)
        return [results[i] for i in range(len(samples))]

    t0 = time.perf_counter()
    # One window per audio-tower call, as for a lone segment: batching the audio tower gains little (its
    # matrices are already large) and would multiply its peak memory (the encoder's attention
    # scores alone are 54 MB a window).
    speech = np.concatenate([backend.encode_windows(windows[i]) for i in rows])  # (B, tokens_per_window, H)
    audio_tower = time.perf_counter() - t0

    t1 = time.perf_counter()
    key = prefix_key(prompt, language)
    left, eos = prefix_ids(pipe, *key)
    if list(ids.left) != left or ids.right[0] != eos:
        raise AssertionError("the prompt's ids before the instruction differ from its task's audio prefix")
    B = len(rows)
    _, one = backend.decode(backend.embed_tokens(np.asarray(left, dtype=np.int64)), backend.empty_cache())
    cache = KVCache([np.repeat(k, B, axis=0) for k in one.keys], [np.repeat(v, B, axis=0) for v in one.values])

    def same_tokens(token_ids: Sequence[int]) -> np.ndarray:
        embeds = backend.embed_tokens(np.asarray(token_ids, dtype=np.int64))
        return np.broadcast_to(embeds, (B, *embeds.shape))

    _, cache = backend.decode_rows(speech, cache)
    _, cache = backend.decode_rows(same_tokens([eos]), cache)
    logits, cache = backend.decode_rows(same_tokens(ids.right[1:]), cache)
    prompt_tokens = cache.length
    prefill = time.perf_counter() - t1

    t2 = time.perf_counter()
    samplers = [Sampler(sampling) for _ in rows]
    answers: list[list[int]] = [[] for _ in rows]
    stop = set(pipe.tokenizer.eos_ids)
    active = list(range(B))  # batch row r of `cache` / `logits` holds answer active[r]
    for step in range(sampling.max_new_tokens):
        keep, tokens = [], []
        for r, a in enumerate(active):
            token = samplers[a](logits[r])
            if token not in stop:
                answers[a].append(token)
                # a loop ends the row as `Pipeline.decode_tokens` ends it: repeats kept
                if sampling.stop_loops and ends_in_loop(answers[a]):
                    continue
                keep.append(r)
                tokens.append(token)
        active = [active[r] for r in keep]
        if not active or step + 1 >= sampling.max_new_tokens:
            break
        if len(keep) < len(logits):
            cache = KVCache([k[keep] for k in cache.keys], [v[keep] for v in cache.values])
        logits, cache = backend.decode_rows(backend.embed_tokens(np.asarray(tokens, dtype=np.int64))[:, None], cache)
    decode = time.perf_counter() - t2

    timings = {"audio_tower_s": audio_tower, "prefill_s": prefill, "decode_s": decode, "batch_rows": float(B)}
    for a, i in enumerate(rows):
        text, thinking = pipe.tokenizer.decode_answer(answers[a])
        results[i] = GenerationResult(
            text=text,
            thinking=thinking,
            token_ids=answers[a],
            prompt_tokens=prompt_tokens,
            n_windows=1,
            audio_seconds=len(samples[i]) / SAMPLE_RATE,
            timings=dict(timings),
        )
    return [results[i] for i in range(len(samples))]
