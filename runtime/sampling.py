"""Next-token choice from a logits vector: greedy, or Hugging Face-style sampling.

Sampling follows `transformers`' warper order and rules exactly (TemperatureLogitsWarper,
then TopKLogitsWarper, then TopPLogitsWarper, min_tokens_to_keep 1), so a seed-free run
draws from the same distribution the reference's `llm.generate(do_sample=True, ...)` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import FastSLMError, ModelFileError, OptionError


# Below this, logits / temperature leaves float64's range for real logit spreads (~1e3) and the
# softmax turns to NaN; such a temperature means greedy, which 0 asks for exactly.
MIN_TEMPERATURE = 1e-4
# Each beam is one more decode row (and, on backends without row batching, one more KV cache copy);
# Whisper's default is 5, and past a few dozen the search costs far more than it can gain.
MAX_BEAM_SIZE = 32


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off.

    beam_size > 1 searches that many hypotheses instead (runtime/beam_search.py; temperature 0 only).
    stop_loops ends an answer that falls into a loop (runtime/repetition.py); parity tests that
    compare a fixed number of tokens from random models turn it off."""

    temperature: float = 0.0
    top_k: int = 20
    top_p: float = 0.95
    seed: int | None = None
    max_new_tokens: int = 512
    beam_size: int = 1
    stop_loops: bool = True

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError(f"temperature {self.temperature!r} is invalid: use 0 for greedy or a positive number")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise OptionError(
                f"temperature {self.temperature!r} is too small to sample with (logits / temperature overflows): "
                f"use 0 for greedy decoding or at least {MIN_TEMPERATURE}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise OptionError(f"top_k {self.top_k!r} is invalid: use a whole number >= 0 (0 turns it off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise OptionError(f"top_p {self.top_p!r} is invalid: use a number in (0, 1] (1 turns it off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise OptionError(f"seed {self.seed!r} is invalid: use a whole number >= 0 or leave it unset")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise OptionError(f"max_new_tokens {self.max_new_tokens!r} is invalid: use a whole number >= 1")
        if not is_beam_size(self.beam_size):
            raise OptionError(f"beam_size {self.beam_size!r} is invalid: use a whole number from 1 (greedy) "
                              f"to {MAX_BEAM_SIZE}")
        if not isinstance(self.stop_loops, bool):
            raise OptionError(f"stop_loops {self.stop_loops!r} is invalid: use true or false")
        if self.beam_size > 1 and self.temperature > 0:
            raise OptionError(f"beam search picks the most likely answer, it does not sample: use temperature 0 "
                              f"with beam_size {self.beam_size}, or beam_size 1 to sample")

    @classmethod
    def reference(cls, seed: int | None = None) -> SamplingOptions:
        """The sampling of the reference FastSLM.generate (do_sample=True)."""
        return cls(temperature=0.2, top_k=20, top_p=0.95, seed=seed, max_new_tokens=512)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replaced(self, **given) -> SamplingOptions:
        """These options with the `given` ones that are not None put in their place.

        Sampling and beam search exclude each other: asking for a temperature above 0 alone drops a
        beam search these options had, and asking for beams alone drops their temperature.
        """
        given = {k: v for k, v in given.items() if v is not None}
        temperature = given.get("temperature")
        if "beam_size" not in given and _is_number(temperature) and temperature > 0:
            given["beam_size"] = 1
        beam_size = given.get("beam_size")
        if "temperature" not in given and _is_int(beam_size) and beam_size > 1:
            given["temperature"] = 0.0
        return replace(self, **given)

    @classmethod
    def from_config(cls, config: dict, source: object) -> SamplingOptions:
        """The decoding a model recommends: config.json's optional "decoding" object (Hugging Face's
        generation_config.json, kept inside the hashed config so a bundle carries it unaltered).

        Callers that pass no SamplingOptions decode this way; any option they pass replaces it.
        """
        decoding = config.get("decoding", {}) if isinstance(config, dict) else {}
        if not isinstance(decoding, dict):
            raise ModelFileError(f"{source}: \"decoding\" must be an object of sampling options; re-create the config")
        unknown = sorted(set(decoding) - set(DECODING_KEYS))
        if unknown:
            raise ModelFileError(f"{source}: \"decoding\" has unknown option(s) {', '.join(unknown)}; "
                                 f"it takes {', '.join(DECODING_KEYS)}")
        try:
            return cls(**decoding)
        except FastSLMError as exc:
            raise ModelFileError(f"{source}: \"decoding\": {exc}") from None


# What a model's config may recommend (a seed belongs to a run, not to a model).
DECODING_KEYS = ("temperature", "top_k", "top_p", "max_new_tokens", "beam_size")


def is_beam_size(value: object) -> bool:
    """A beam width the search takes: a whole number from 1 (greedy) to MAX_BEAM_SIZE."""
    return _is_int(value) and 1 <= value <= MAX_BEAM_SIZE


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


class Sampler:
    """Picks one token id per call; its random stream is seeded once from options.seed."""

    def __init__(self, options: SamplingOptions | None = None):
        self.options = options or SamplingOptions()
        self._rng = np.random.default_rng(self.options.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"expected a 1-D logits vector, got shape {logits.shape}")
        if self.options.greedy:
            # NaN wins np.argmax; a broken backend must fail loudly, not emit token garbage.
            if np.isnan(logits).any():
                raise ValueError("logits contain NaN")
            return int(np.argmax(logits))
        ids, scores = self.candidates(logits)
        probs = np.exp(scores - scores.max())
        cdf = np.cumsum(probs)
        pick = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(pick, len(ids) - 1)])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids that survive temperature, top-k and top-p, with their scaled logits."""
        scores = np.asarray(logits, dtype=np.float64) / self.options.temperature
        if np.isnan(scores).any():
            raise ValueError("logits contain NaN")
        ids = np.arange(scores.size)
        k = self.options.top_k
        if 0 < k < scores.size:
            # HF keeps every score >= the k-th largest, ties included.
            kth = np.partition(scores, scores.size - k)[scores.size - k]
            ids = np.flatnonzero(scores >= kth)
        ids = ids[scores[ids] > -np.inf]  # masked tokens (-inf) can never be drawn
        if ids.size == 0:
            raise ValueError("every logit is -inf: nothing to sample")
        kept = scores[ids]
        if self.options.top_p < 1.0:
            order = np.argsort(kept, kind="stable")  # ascending, like HF's sort
            sorted_scores = kept[order]
            probs = np.exp(sorted_scores - sorted_scores[-1])
            cum = np.cumsum(probs / probs.sum())
            remove = cum <= 1 - self.options.top_p
            remove[-1] = False  # min_tokens_to_keep = 1
            order = order[~remove]
            ids, kept = ids[order], kept[order]
        return ids, kept
