"""Beam search over the LLM: the answer with the best mean log-probability among `beam_size` kept in step.

The rules are Whisper's (`whisper.decoding.BeamSearchDecoder` with patience 1 and
`MaximumLikelihoodRanker` without a length penalty), so a FastSLM and Whisper decoded with the same
beam compare fairly:

- every live hypothesis proposes its `beam_size + 1` most likely next tokens; of all proposals, in
  order of summed log-probability, one that ends the answer (an end token) is finished while fewer
  than `beam_size` are, any other joins the next step's beams until there are `beam_size` of them;
- a proposal that ends the answer in a loop (repetition.py) is finished too, with the loop's
  repeats and the near-copies leading into it cut: nothing of a beam search's answer is shown
  before it ends, so unlike a streamed greedy answer it can drop them. It keeps the log-probability
  of every token it decoded, so a loop ranks below an answer that ends as well as it did;
- the search stops once `beam_size` answers are finished, or after `max_new_tokens` tokens (then
  the most likely live beams fill the answers up to `beam_size`);
- the answer kept has the highest summed log-probability divided by its token count (the end token
  is scored but not counted).

Backends that decode several equally long rows per call (`decode_rows`, ONNX Runtime) run all
beams in one call per step, their KV cache rows gathered by parent; the others decode beam by beam,
a beam whose parent another beam already continues getting a copy of the parent's cache. Either way
every step moves whole caches (prompt included), so a search over a long recording's context costs
far more than greedy decoding of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import Backend
from .kv_cache import KVCache
from .repetition import cut_loop, ends_in_loop


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]
    logprob: float  # sum over its tokens (and its end token, once finished)

    @property
    def score(self) -> float:
        return self.logprob / max(1, len(self.tokens))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("logits contain NaN")  # as the greedy Sampler: a broken backend fails loudly
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def beam_search(backend: Backend, logits: np.ndarray, cache: KVCache, beam_size: int, max_new_tokens: int,
                stop: set[int], stop_loops: bool = True) -> list[int]:
    """The answer's token ids (without its end token) after a prefill that left `logits` and `cache`."""
    rows = callable(getattr(backend, "decode_rows", None))
    beams = [Hypothesis((), 0.0)]
    step_logits = np.asarray(logits)[None]  # (live beams, vocab)
    caches: list[KVCache] = [cache]  # per beam, or one cache of len(beams) rows when `rows`
    finished: list[Hypothesis] = []
    for step in range(max_new_tokens):
        logp = log_softmax(step_logits)
        proposals = []
        for b, beam in enumerate(beams):
            for token in np.argsort(-logp[b], kind="stable")[: beam_size + 1]:
                proposals.append((beam.logprob + float(logp[b, token]), b, int(token)))
        proposals.sort(key=lambda p: -p[0])  # stable: ties keep beam, then token order
        live, parents = [], []
        for logprob, b, token in proposals:
            if token in stop:
                if len(finished) < beam_size:
                    finished.append(Hypothesis(beams[b].tokens, logprob))
            else:
                tokens = beams[b].tokens + (token,)
                if stop_loops and ends_in_loop(tokens):  # ends its beam as an end token would, cut after one cycle
                    if len(finished) < beam_size:
                        finished.append(Hypothesis(tuple(cut_loop(tokens)), logprob))
                    continue
                live.append(Hypothesis(tokens, logprob))
                parents.append(b)
                if len(live) == beam_size:
                    break
        beams = live
        if len(finished) >= beam_size or not beams or step + 1 >= max_new_tokens:
            break
        embeds = backend.embed_tokens(np.array([h.tokens[-1] for h in beams], dtype=np.int64))  # (B, H)
        if rows:
            (parent_cache,) = caches
            gathered = KVCache([k[parents] for k in parent_cache.keys], [v[parents] for v in parent_cache.values])
            step_logits, next_cache = backend.decode_rows(embeds[:, None], gathered)
            caches = [next_cache]
        else:
            # every copy is taken before any decode: a backend may extend a cache in place
            taken: set[int] = set()
            inputs = []
            for b in parents:
                inputs.append(caches[b] if b not in taken else caches[b].copy())
                taken.add(b)
            outputs = [backend.decode(embeds[i : i + 1], c) for i, c in enumerate(inputs)]
            step_logits = np.stack([out[0] for out in outputs])
            caches = [out[1] for out in outputs]
    cut = sorted(beams, key=lambda h: -h.logprob)[: max(0, beam_size - len(finished))]
    best = max(finished + cut, key=lambda h: h.score)
    return list(best.tokens)
