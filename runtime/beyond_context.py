"""Questions about recordings longer than one LLM context: answer each part that fits, then combine.

The strategy, by task:
- transcribe / translate: each part (as many whole 30 s windows as fit beside the prompt and the
  answer, parts of equal size) is transcribed or translated alone; the texts are joined in order.
- summarize / a question (map-reduce): each part is summarized or the question is answered for
  each part alone ("map"); then the same LLM gets one text-only turn holding the partial answers,
  labelled with their times, and the instruction for the whole recording ("reduce"). If the
  partial answers do not fit one turn, neighbouring ones are reduced first, recursively.

Every part reuses the speech tokens the session already has: the audio tower never runs twice.
There is no length limit: the session reads the recording in bounded blocks (streaming.open_recording)
and holds only its speech tokens (the demo model: 150 x 256 float32 per 30 s, 18 MB an hour).
The result says which strategy ran (`GenerationResult.strategy`, one line; `fastslm-run` prints
it on stderr) and keeps each part's answer (`parts`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np

from .errors import OptionError
from .prompt import Task, build_text_prompt, resolve_task
from .sampling import SamplingOptions

if TYPE_CHECKING:
    from .generate import GenerationResult
    from .session import AudioSession

JOINED_TASKS = (Task.ASR, Task.AST)  # their answers for consecutive parts simply follow one another


def plan_parts(session: "AudioSession", prompt: str | None, language: str | None, max_new_tokens: int) -> list[tuple[int, int]]:
    """Window ranges [start, end) of equal-sized parts that each fit the context with the prompt and answer."""
    pipe = session.pipe
    text = len(pipe.prompt_ids(prompt, language))
    room = (pipe.backend.max_context - text - max_new_tokens) // pipe.backend.tokens_per_window
    if room < 1:
        raise OptionError(
            f"max_new_tokens {max_new_tokens} leaves no room for audio in the model's {pipe.backend.max_context}-token "
            "context; lower it"
        )
    windows = session.speech.n_windows
    size = math.ceil(windows / math.ceil(windows / room))
    return [(start, min(start + size, windows)) for start in range(0, windows, size)]


def describe(session: "AudioSession", prompt: str | None, language: str | None, max_new_tokens: int) -> str:
    """The one line that names the strategy, e.g. for stderr before the answer streams."""
    parts = plan_parts(session, prompt, language, max_new_tokens)
    task, _ = resolve_task(prompt)
    longest = max(end - start for start, end in parts) * 30 / 60
    head = (
        f"the recording is {duration_text(session.speech.seconds)}, past the model's {session.pipe.backend.max_context}-token "
        f"context: "
    )
    if task in JOINED_TASKS:
        verb = "transcribed" if task is Task.ASR else "translated"
        return head + f"{verb} in {len(parts)} parts of at most {longest:g} min, joined in order"
    return head + (
        f"map-reduce: answered for each of {len(parts)} parts of at most {longest:g} min alone, "
        f"then once more over the {len(parts)} partial answers as text"
    )


def answer_in_parts(
    session: "AudioSession",
    prompt: str | None,
    language: str | None,
    sampling: SamplingOptions,
    asked: float,
    timings: dict[str, float],
) -> Generator[str, None, "GenerationResult"]:
    """Yield the answer's text pieces; return the GenerationResult (with strategy and parts)."""
    from .generate import GenerationResult, SpeechTokens
    from .session import AudioSession

    pipe = session.pipe
    task, instruction = resolve_task(prompt)
    per_window = pipe.backend.tokens_per_window
    total = session.speech.seconds
    parts = []
    prefilled: list[int] = []  # positions prefilled per LLM call (each part, each reduce turn)
    first_at: float | None = None
    for index, (start, end) in enumerate(plan_parts(session, prompt, language, sampling.max_new_tokens)):
        seconds = min(end * 30.0, total) - start * 30.0
        speech = SpeechTokens(session.speech.embeddings[start * per_window : end * per_window], end - start, seconds)
        part = AudioSession(pipe, speech, None)
        pieces = part.stream(prompt, sampling=sampling, language=language)
        if task in JOINED_TASKS:  # stream the parts as they come
            for i, piece in enumerate(pieces):
                if first_at is None:
                    first_at = time.perf_counter()
                yield (" " + piece) if index and i == 0 else piece
        else:
            for _ in pieces:
                pass
        result = part.last_result
        timings["prefill_s"] += result.timings["prefill_s"]
        prefilled.append(result.prompt_tokens)
        parts.append({"start": start * 30.0, "end": start * 30.0 + seconds, "text": result.text, "token_ids": result.token_ids})

    decode_start = time.perf_counter()
    if task in JOINED_TASKS:
        text = " ".join(p["text"] for p in parts if p["text"])
        ids = [t for p in parts for t in p["token_ids"]]
    else:
        reduced = yield from _reduce(session, instruction, task, parts, sampling, timings, prefilled)
        first_at = reduced.first_at
        text, ids = pipe.tokenizer.decode_answer(reduced.ids)[0], reduced.ids
    timings["time_to_first_token_s"] = (first_at or time.perf_counter()) - asked
    timings["decode_s"] = time.perf_counter() - decode_start
    return GenerationResult(
        text=text,
        token_ids=ids,
        prompt_tokens=sum(prefilled),  # every position prefilled: the parts' prompts and the reduce turns'
        n_windows=session.speech.n_windows,
        audio_seconds=total,
        timings=timings,
        strategy=describe(session, prompt, language, sampling.max_new_tokens),
        parts=[{k: p[k] for k in ("start", "end", "text")} for p in parts],
    )


def _reduce(session, instruction: str, task: Task, parts: list[dict], sampling, timings, prefilled: list[int]):
    """One text-only turn over the partial answers (recursively over groups when they do not fit)."""
    from .generate import Prefill
    from .session import TimedTokens

    pipe = session.pipe
    backend = pipe.backend
    ids = pipe.tokenizer.encode(build_text_prompt(_reduce_instruction(instruction, task, parts)))
    if len(ids) + sampling.max_new_tokens > backend.max_context:
        if len(parts) == 1:
            raise OptionError(
                f"one part's answer and max_new_tokens {sampling.max_new_tokens} do not fit the model's "
                f"{backend.max_context}-token context together; lower max_new_tokens"
            )
        half = len(parts) // 2
        merged = []
        for group in (parts[:half], parts[half:]):
            inner = _drain(_reduce(session, instruction, task, group, sampling, timings, prefilled))
            text = pipe.tokenizer.decode_answer(inner.ids)[0]
            merged.append({"start": group[0]["start"], "end": group[-1]["end"], "text": text})
        return (yield from _reduce(session, instruction, task, merged, sampling, timings, prefilled))
    t0 = time.perf_counter()
    prefilled.append(len(ids))
    logits, cache = backend.decode(backend.embed_tokens(np.asarray(ids, dtype=np.int64)), backend.empty_cache())
    timings["prefill_s"] += time.perf_counter() - t0
    tokens = TimedTokens(pipe.decode_tokens(Prefill(cache, logits, cache.length), sampling))
    yield from pipe.text_pieces(tokens)
    return tokens


def _drain(gen):
    """Run a reduce step whose text is an intermediate result: consume its pieces, keep its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def _reduce_instruction(instruction: str, task: Task, parts: list[dict]) -> str:
    what = "summarized" if task is Task.SSUM else f'asked "{instruction}"'
    lines = [f"A long recording was cut into {len(parts)} parts and each part was {what} alone:"]
    lines += [f"Part {i + 1} ({_clock(p['start'])}-{_clock(p['end'])}): {p['text'] or '(no answer)'}" for i, p in enumerate(parts)]
    if task is Task.SSUM:
        lines.append(f"From these, for the whole recording: {instruction}")
    else:
        lines.append(f"Answer for the whole recording: {instruction}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def duration_text(seconds: float) -> str:
    """'25.5 min' or '2.0 h'."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
