"""A decoding that falls into a loop ends there (runtime/repetition.py), greedy and beam search alike."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastslm.runtime.beam_search import beam_search
from fastslm.runtime.errors import OptionError
from fastslm.runtime.generate import Pipeline, Prefill
from fastslm.runtime.repetition import (
    MIN_REPEATS,
    MIN_TOKENS,
    NEAR_WINDOW,
    cut_loop,
    ends_in_loop,
    loop_period,
    near_loop_start,
    without_loop,
)
from fastslm.runtime.sampling import SamplingOptions

from .test_beam_search import STOP, TableLM

PREFIX = [3, 9, 4, 10]
SPAN = [5, 6, 7, 8]  # 4 tokens: MIN_REPEATS copies of it reach MIN_TOKENS


def test_a_loop_is_a_span_repeated_enough_times_to_cover_enough_tokens():
    assert (MIN_REPEATS, MIN_TOKENS) == (4, 16)
    assert loop_period(PREFIX + SPAN * 4) == 4
    assert loop_period(PREFIX + SPAN * 3) == 0  # three times over can be speech
    assert loop_period(PREFIX + SPAN * 4 + [3]) == 0  # the loop must end the answer
    assert loop_period([7] * 15) == 0 and loop_period([7] * 16) == 1  # one token needs 16 repeats
    assert loop_period([1, 2] * 7) == 0 and loop_period([1, 2] * 8) == 2
    assert loop_period([1, 2, 3] * 5) == 0 and loop_period([1, 2, 3] * 6) == 3
    assert loop_period([]) == 0 and loop_period([5, 5, 5, 5]) == 0


def test_a_loop_is_cut_back_to_its_first_span():
    assert without_loop(PREFIX + SPAN * 6, 4) == PREFIX + SPAN
    assert without_loop([7] * 20, 1) == [7]
    # a loop that starts in the middle of a span is cut after its first cycle, in whatever rotation
    assert without_loop([1, 6, 7, 8] + SPAN * 4, 4) == [1, 6, 7, 8, 5]
    assert without_loop([3, 9] + SPAN * 4, 4) == [3, 9] + SPAN  # the prefix's 9 is no part of it


def test_the_cut_walks_back_through_the_near_copies_that_led_into_the_loop():
    """A beam of run 7's INT8 bundle (eval_seen #7): "in for destroy in for destroyed" x3, a copy
    with one token changed and one dropped, then the exact loop; cut after the first exact copy."""
    lead = [44, 649, 348, 1105, 68, 337, 1710, 410, 220, 360, 65, 337, 781, 1204, 1936, 82, 363, 362, 435, 385]
    near = [284, 395, 340, 464, 354, 88]  # "in for destroy"
    cycle = [284, 395, 340, 464, 354, 88, 337]  # "in for destroyed"
    drift = [284, 395, 340, 464, 354, 88, 305, 395, 340, 464, 354, 88, 337]
    tokens = lead + near + cycle * 3 + drift + cycle * 3 + [284]
    assert loop_period(tokens) == 7
    assert without_loop(tokens, 7) == lead + near + cycle
    # a copy more than two periods before the next one is left alone: it may be speech
    spoken = [5, 6, 7, 8, 1, 2, 3, 4, 9, 10]
    assert without_loop(spoken + SPAN * 4, 4) == spoken + SPAN


# run 7's INT8 beams on eval_seen #7: "in for destroy" (NEAR), "in for destroyed" (CYCLE) and
# "for destroyed" (DROPPED: "in" left out), with "destroying" (RING) now and then
LEAD = [44, 649, 348, 1105, 68, 337, 1710, 410, 220, 360, 65, 337, 781, 1204, 1936, 82, 363, 362, 435, 385]
NEAR = [284, 395, 340, 464, 354, 88]
CYCLE = NEAR + [337]
DROPPED = CYCLE[1:]
RING = NEAR + [305]


def varied_loop(copies: int) -> list[int]:
    """A loop that never repeats exactly four times back to back: every other copy varies."""
    variants = [CYCLE, RING, CYCLE, DROPPED, CYCLE, NEAR]
    return [t for k in range(copies) for t in variants[k % len(variants)]]


def test_a_loop_with_variations_is_seen_and_cut_after_its_first_cycle():
    tokens = LEAD + varied_loop(12)
    assert loop_period(tokens) == 0  # no exact loop anywhere in it
    assert all(loop_period(tokens[:n]) == 0 for n in range(len(tokens)))
    assert ends_in_loop(tokens)
    assert near_loop_start(tokens) == len(LEAD)  # walked back over the variants to where it began
    assert cut_loop(tokens) == LEAD + CYCLE
    # seen before max_new_tokens: within a window and a bit of the loop's start
    first = next(n for n in range(len(tokens) + 1) if ends_in_loop(tokens[:n]))
    assert NEAR_WINDOW <= first <= len(LEAD) + NEAR_WINDOW
    assert cut_loop(tokens[:first]) == LEAD + CYCLE
    # an exact loop is still cut by its period
    assert cut_loop(LEAD + CYCLE * 5) == LEAD + CYCLE


def test_speech_never_reads_as_a_loop():
    """Every transcript the repository holds, one after another as the answer about one long recording,
    and as a summary's thinking (the transcript, then its content words): no prefix trips either stop."""
    from tokenizers import Tokenizer

    from fastslm.models.demo import tasks

    root = Path(__file__).resolve().parents[1] / "models" / "demo"
    tokenizer = Tokenizer.from_file(str(root / "shipped" / "model" / "tokenizer.json"))
    texts = [json.loads(line)["text"] for f in sorted(root.glob("*/*.jsonl")) for line in f.read_text().splitlines()]
    assert len(texts) >= 100
    long_answer = tokenizer.encode(" ".join(texts), add_special_tokens=False).ids
    thinking = [tokenizer.encode(f"<think>\n{t}\n{' '.join(tasks.content_words(t))}\n</think>\n{tasks.summary(t)}",
                                 add_special_tokens=False).ids for t in texts]
    for answer in [long_answer, *thinking]:
        assert not any(ends_in_loop(answer[:n]) for n in range(1, len(answer) + 1))
    # a phrase said three times over is speech for both stops, four times a loop for both
    phrase = tokenizer.encode(" And so, my fellow Americans: ask not what your country can do for you,"
                              " ask what you can do for your country.",
                              add_special_tokens=False).ids
    assert len(phrase) * 3 >= NEAR_WINDOW
    assert not any(ends_in_loop((phrase * 3)[:n]) for n in range(1, 3 * len(phrase) + 1))
    assert ends_in_loop(phrase * 4)


class LoopLM(TableLM):
    """After PREFIX, the model is sure the next token continues SPAN forever (p 0.97 each step), and
    all but sure that the answer never ends (p 1e-6 for the end token)."""

    def logits(self, history):
        if len(history) < len(PREFIX):
            want = PREFIX[len(history)]
        else:
            want = SPAN[(len(history) - len(PREFIX)) % len(SPAN)]
        p = np.full(self.vocab, 0.03 / (self.vocab - 2))
        p[STOP], p[want] = 1e-6, 0.97
        return np.log(p).astype(np.float32)


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_finishes_a_looping_beam_without_its_repeats(beam):
    lm = LoopLM(vocab=12, seed=0)
    logits, cache = lm.start()
    answer = beam_search(lm, logits, cache, beam, 200, {STOP})
    assert answer == PREFIX + SPAN
    # it stops once `beam` beams have looped or ended, not at max_new_tokens (one call per beam per step)
    assert lm.calls / beam < 40


def test_greedy_decoding_stops_at_the_first_token_that_makes_a_loop():
    lm = LoopLM(vocab=12, seed=0)
    logits, cache = lm.start()
    pipe = SimpleNamespace(backend=lm, tokenizer=SimpleNamespace(eos_ids=[STOP]))
    tokens = list(Pipeline.decode_tokens(pipe, Prefill(cache, logits, 0), SamplingOptions(max_new_tokens=200)))
    # a streamed answer keeps what it has shown: the repeats up to the one that made the loop
    assert tokens == PREFIX + SPAN * MIN_REPEATS
    assert lm.calls == len(tokens) - 1


def test_stop_loops_off_decodes_to_max_new_tokens():
    pipe = SimpleNamespace(backend=LoopLM(vocab=12, seed=0), tokenizer=SimpleNamespace(eos_ids=[STOP]))
    logits, cache = pipe.backend.start()
    options = SamplingOptions(max_new_tokens=50, stop_loops=False)
    assert len(list(Pipeline.decode_tokens(pipe, Prefill(cache, logits, 0), options))) == 50
    beam = beam_search(LoopLM(vocab=12, seed=0), logits, cache, 2, 50, {STOP}, stop_loops=False)
    assert beam[:len(PREFIX)] == PREFIX and len(beam) == 50
    with pytest.raises(OptionError, match="stop_loops"):
        SamplingOptions(stop_loops="no")


class VariedLoopLM(TableLM):
    """After LEAD, the model is sure of the next token of a loop with variations (varied_loop), and all
    but sure that the answer never ends."""

    SCRIPT = LEAD + varied_loop(40)

    def logits(self, history):
        p = np.full(self.vocab, 0.03 / (self.vocab - 2))
        p[STOP], p[self.SCRIPT[len(history)]] = 1e-6, 0.97
        return np.log(p).astype(np.float32)


def test_beam_search_and_greedy_stop_a_loop_with_variations():
    lm = VariedLoopLM(vocab=2048, seed=0)
    logits, cache = lm.start()
    assert beam_search(lm, logits, cache, 4, 200, {STOP}) == LEAD + CYCLE
    assert lm.calls / 4 < len(LEAD) + NEAR_WINDOW + 4  # stopped about a window into the loop, not at 200
    pipe = SimpleNamespace(backend=VariedLoopLM(vocab=2048, seed=0), tokenizer=SimpleNamespace(eos_ids=[STOP]))
    logits, cache = pipe.backend.start()
    tokens = list(Pipeline.decode_tokens(pipe, Prefill(cache, logits, 0), SamplingOptions(max_new_tokens=200)))
    first = next(n for n in range(len(VariedLoopLM.SCRIPT)) if ends_in_loop(VariedLoopLM.SCRIPT[:n]))
    assert tokens == VariedLoopLM.SCRIPT[:first]  # greedy keeps what it streamed, up to the token that told
