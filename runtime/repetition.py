"""Telling a decoding that has left the audio: its answer ends in one span of tokens, over and over.

A speech LM that loses its place in the audio can fall into a loop ("for destroy-end for destroy-end
..."), and then runs on to max_new_tokens, each repeat another run of inserted words. Whisper catches
this after the fact with a gzip compression-ratio threshold and re-decodes at a higher temperature;
a loop is cheaper to see while it happens, from the tokens alone, and stopping there also saves the
decoding steps. The threshold is set so that speech does not trip it: a span must repeat at least
MIN_REPEATS times back to back and the repeats must cover at least MIN_TOKENS tokens, so a phrase of
four or more tokens said four times over trips it, while "no, no, no" does not, nor a one-token word
said fewer than sixteen times.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_REPEATS = 4
MIN_TOKENS = 16
MAX_PERIOD = 32  # longest repeating span looked for, in tokens


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
