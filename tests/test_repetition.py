"""A decoding that falls into a loop ends there (runtime/repetition.py), greedy and beam search alike."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fastslm.runtime.beam_search import beam_search
from fastslm.runtime.errors import OptionError
from fastslm.runtime.generate import Pipeline, Prefill
from fastslm.runtime.repetition import MIN_REPEATS, MIN_TOKENS, loop_period, without_loop
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
