"""Telling a decoding that has left the audio: its answer ends in one span of tokens, over and over.

A speech LM that loses its place in the audio can fall into a loop ("for destroy-end for destroy-end
..."), and then runs on to max_new_tokens, each repeat another run of inserted words. Whisper catches
this after the fact with a gzip compression-ratio threshold and re-decodes at a higher temperature;
a loop is cheaper to see while it happens, from the tokens alone, and stopping there also saves the
decoding steps. The threshold is set so that speech does not trip it: a span must repeat at least
MIN_REPEATS times back to back and the repeats must cover at least MIN_TOKENS tokens, so a phrase of
four or more tokens said four times over trips it, while "no, no, no" does not, nor a one-token word
said fewer than sixteen times.

A decoder can also loop with small variations ("in for destroyed in for destroying for destroyed
in ..."), which no exact repeat matches, and then runs on just the same. That is seen from the
trigrams of the answer's last NEAR_WINDOW tokens: speech there holds about as many distinct
trigrams as tokens, a loop as many as its period. The window must hold at most NEAR_WINDOW /
MIN_REPEATS distinct trigrams, each said four times on average, so a phrase said three times over
stays speech here as it does for the exact stop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

MIN_REPEATS = 4
MIN_TOKENS = 16
MAX_PERIOD = 32  # longest repeating span looked for, in tokens
NEAR_WINDOW = 64  # tokens whose trigrams tell a loop with variations
NEAR_MAX_DISTINCT = NEAR_WINDOW // MIN_REPEATS
NEAR_GAP = 4  # a changed token breaks three trigrams: the walk back to a loop's start steps over that many


def ends_in_loop(tokens: Sequence[int]) -> bool:
    """Whether the answer has left the audio: it ends in an exact loop, or in one with variations."""
    return bool(loop_period(tokens)) or near_loop_start(tokens) is not None


def cut_loop(tokens: Sequence[int]) -> list[int]:
    """An answer that ends in a loop (ends_in_loop), kept through the loop's first cycle."""
    period = loop_period(tokens)
    if period:
        return without_loop(tokens, period)
    start = near_loop_start(tokens)
    if start is None:
        return list(tokens)
    seen: set[tuple[int, ...]] = set()
    for i in range(start, len(tokens) - 2):
        trigram = tuple(tokens[i : i + 3])
        if trigram in seen:  # the loop has come round once
            return list(tokens[:i])
        seen.add(trigram)
    return list(tokens)


def near_loop_start(tokens: Sequence[int]) -> int | None:
    """Where the loop with variations that `tokens` ends in begins; None if it ends in speech.

    The start is found by walking back from the window through the trigrams the window repeats,
    stepping over the few that a changed or dropped token breaks."""
    n_tokens = len(tokens)
    if n_tokens < NEAR_WINDOW:
        return None
    counts = Counter(tuple(tokens[i : i + 3]) for i in range(n_tokens - NEAR_WINDOW, n_tokens - 2))
    if len(counts) > NEAR_MAX_DISTINCT:
        return None
    looping = {trigram for trigram, count in counts.items() if count > 1}
    start = n_tokens - NEAR_WINDOW
    while True:
        earlier = next((i for i in range(start - 1, max(-1, start - 1 - NEAR_GAP), -1)
                        if tuple(tokens[i : i + 3]) in looping), None)
        if earlier is None:
            return start
        start = earlier


def loop_period(tokens: Sequence[int]) -> int:
    """The length of the span that `tokens` ends in, repeated back to back into a loop; 0 if none.

    Only a loop that the last token completes is found, so a decoder that checks after every token
    sees each loop at the first token that makes it one."""
    n_tokens = len(tokens)
    for period in range(1, min(MAX_PERIOD, n_tokens // MIN_REPEATS) + 1):
        repeats = max(MIN_REPEATS, -(-MIN_TOKENS // period))  # ceil: the repeats cover MIN_TOKENS
        span = period * repeats
        if span > n_tokens:
            continue
        # compared from the last token back, so a non-loop fails at once, with no copy of the tail
        if all(tokens[i] == tokens[i - period] for i in range(n_tokens - 1, n_tokens - span + period - 1, -1)):
            return period
    return 0


def without_loop(tokens: Sequence[int], period: int) -> list[int]:
    """`tokens` that end in a loop of `period`-token spans, cut after the loop's first cycle.

    A decoder often drifts into its loop through copies that differ in a token or two ("in for
    destroy in for destroyed in for destroying for destroyed in ..."), so the cut walks back through
    every copy of the cycle, in any rotation, that starts within two periods of the one after it."""
    n_tokens = len(tokens)
    cycle = tuple(tokens[n_tokens - period :])
    rotations = {cycle[i:] + cycle[:i] for i in range(period)}
    start = n_tokens - period
    while True:
        earliest = next((s for s in range(max(0, start - 2 * period), start) if tuple(tokens[s : s + period]) in rotations),
                        None)
        if earliest is None:
            return list(tokens[: start + period])
        start = earliest
