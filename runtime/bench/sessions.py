"""Questions about long recordings: `python -m fastslm.runtime.bench.sessions [--seconds 600 3600]`.

For each length it takes fastslm-bench's recording of held-out speech (`cli._recordings`: the demo
model's held-out clips and jfk.flac joined by pauses, seeded), then measures on one loaded pipeline:
- the first question's time to first token (opening: decode + audio tower + prefix prefill) and the
  second question's (its own instruction tokens only), and their ratio;
- the cache saved next to the recording, then loaded from disk: load time and time to first token;
- the recording fed as a stream in 1 s chunks, as fast as the machine takes it: time to first token
  after the stream ends, against a 30 s clip opened whole, and how many windows were re-encoded.
It prints a markdown table (for docs/BENCHMARKS.md) and writes it, with a JSON copy, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE, load_audio
from ..generate import Pipeline
from ..prefix_cache import cache_path_for
from ..sampling import SamplingOptions
from .cli import _machine, _recordings

FIRST = "What is the first word?"
SECOND = "What is the last word?"


STEPS = ("questions", "cache", "stream")


def measure(pipe: Pipeline, recording: Path, clip: Path, sampling: SamplingOptions, steps: tuple[str, ...] = STEPS) -> dict:
    """One row; `steps` (a subset of STEPS) lets a long recording be measured in shorter runs."""
    row: dict = {"seconds": sf.info(str(recording)).duration}
    cache = cache_path_for(recording)
    cache.unlink(missing_ok=True)
    first = None

    if "questions" in steps or "cache" in steps:
        session = pipe.open(recording)
        first = session.ask(FIRST, sampling=sampling)
        second = session.ask(SECOND, sampling=sampling)
        row.update(first_ttft_s=first.timings["time_to_first_token_s"], second_ttft_s=second.timings["time_to_first_token_s"],
                   audio_tower_s=first.timings["audio_tower_s"], prefix_prefill_s=first.timings["prefill_s"])
        row["second_over_first"] = row["second_ttft_s"] / row["first_ttft_s"]

    if "cache" in steps:
        session.save(cache)
        row["cache_mb"] = cache.stat().st_size / 1e6
        t0 = time.perf_counter()
        reopened = pipe.open(recording, cache=cache)
        row["cache_open_s"] = time.perf_counter() - t0  # file hash + load
        row["cache_load_s"] = reopened._opening["cache_load_s"]
        again = reopened.ask(FIRST, sampling=sampling)
        row["cached_ttft_s"] = again.timings["time_to_first_token_s"]
        row["cached_same_tokens"] = again.token_ids == first.token_ids
        cache.unlink()

    if "stream" in steps:
        samples = load_audio(recording)
        live = pipe.open_stream(prepare=[FIRST])
        t0 = time.perf_counter()
        for start in range(0, len(samples), SAMPLE_RATE):
            live.feed(samples[start : start + SAMPLE_RATE])
        row["stream_feed_rtf"] = (time.perf_counter() - t0) / row["seconds"]  # < 1: the machine keeps up with real time
        streamed = live.finish().ask(FIRST, sampling=sampling)
        row["stream_end_ttft_s"] = streamed.timings["time_to_first_token_s"]
        row["stream_reencoded_windows"] = live.reencoded_windows
        if first is not None:
            row["stream_same_tokens"] = streamed.token_ids == first.token_ids

        clip_answer = pipe.open(clip).ask(FIRST, sampling=sampling)
        row["clip30_ttft_s"] = clip_answer.timings["time_to_first_token_s"]
        row["stream_end_over_clip30"] = row["stream_end_ttft_s"] / row["clip30_ttft_s"]
    return row


COLUMNS = [
    ("seconds", "audio s", "{:.0f}"), ("audio_tower_s", "audio tower s", "{:.1f}"), ("first_ttft_s", "1st TTFT s", "{:.2f}"),
    ("second_ttft_s", "2nd TTFT s", "{:.3f}"), ("second_over_first", "2nd/1st", "{:.3f}"),
    ("cache_mb", "cache MB", "{:.1f}"), ("cache_load_s", "cache load s", "{:.2f}"), ("cache_open_s", "open from cache s", "{:.2f}"),
    ("cached_ttft_s", "TTFT from cache s", "{:.2f}"), ("stream_feed_rtf", "stream RTF", "{:.3f}"),
    ("stream_end_ttft_s", "TTFT at stream end s", "{:.2f}"), ("clip30_ttft_s", "30 s clip TTFT s", "{:.2f}"),
    ("stream_end_over_clip30", "end/clip", "{:.2f}"), ("stream_reencoded_windows", "re-encoded", "{}"),
    ("cached_same_tokens", "cache same tokens", "{}"), ("stream_same_tokens", "stream same tokens", "{}"),
]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastslm.runtime.bench.sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or bundle [default: the shipped demo bundle]")
    parser.add_argument("--seconds", type=int, nargs="+", default=[600, 3600])
    parser.add_argument("--out", type=Path, default=Path("work/bench_sessions"))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="what to measure (split a long recording's row over shorter runs)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # the 1-minute load average: was the machine otherwise busy?
    pipe = Pipeline.load(args.model)
    sampling = SamplingOptions(max_new_tokens=args.max_new_tokens)
    recordings = _recordings(args.out, [30, *args.seconds])
    clip = recordings[30][0]
    pipe.open(clip).ask(FIRST, sampling=sampling)  # warm-up: first ORT runs allocate
    rows = []
    for seconds in args.seconds:
        rows.append(measure(pipe, recordings[seconds][0], clip, sampling, tuple(args.steps)))
        print(json.dumps(rows[-1]), flush=True)
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {_machine()}, "
        f"model {pipe.model_name} on {pipe.backend.name}, questions {FIRST!r} then {SECOND!r}, greedy, "
        f"max_new_tokens {args.max_new_tokens}, steps {' '.join(args.steps)}, load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    text = header + "\n\n" + table(rows)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
