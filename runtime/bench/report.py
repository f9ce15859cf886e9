"""fastslm-bench's results as a markdown report and a PNG plot."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .runs import PEER, RunResult


def _median(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def paired_speedup(runs: list[RunResult], system: str, seconds: float) -> float:
    """Median over repeats of peer wall / system wall, each pair from the same repeat (run back to back)."""
    by = {(r.system, r.repeat): r for r in runs if r.seconds == seconds and not r.error}
    ratios = [by[(PEER, k)].wall_s / by[(system, k)].wall_s for (s, k) in by if s == system and (PEER, k) in by]
    return _median(ratios)


def summary(runs: list[RunResult], wers: dict) -> dict:
    """{(system, seconds): {wall_s, rss_mb, wer, windows, speedup}} from the runs."""
    groups = defaultdict(list)
    for r in runs:
        if not r.error:
            groups[(r.system, r.seconds)].append(r)
    out = {}
    for (system, seconds), rs in groups.items():
        out[(system, seconds)] = {
            "wall_s": _median([r.wall_s for r in rs]),
            "rss_mb": max(r.peak_rss_mb for r in rs),
            "wer": wers.get((system, seconds)),
            "windows": rs[0].windows,
            "repeats": len(rs),
            "speedup": paired_speedup(runs, system, seconds) if system != PEER else None,
        }
    return out


def _fmt(x, spec=".1f", none="-"):
    return none if x is None or x != x else format(x, spec)


def markdown(meta: dict, table: dict, stages: dict, clip_wer: dict, done_when: list[str]) -> str:
    lines = [f"# fastslm-bench results", "", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             f"- command: `{meta['command']}`", f"- default fastslm variant: {meta['default']}",
             f"- recordings: held-out demo clips + jfk.flac joined by 0.3-1.5 s pauses (seed 0); "
             f"runs are whole processes, interleaved (A B A B ...), the median of the repeats", ""]  # fmt: skip
    lines += ["## Done when", ""] + [f"- {line}" for line in done_when] + [""]
    lines += ["## Whole-process transcription", "",
              "| system | audio s | repeats | wall s | real-time factor | peak RSS MiB | WER % | windows | speed vs faster-whisper (paired) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (system, seconds), row in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(
            f"| {system} | {seconds:.0f} | {row['repeats']} | {_fmt(row['wall_s'], '.2f')} | {_fmt(row['wall_s'] / seconds, '.4f')} "
            f"| {_fmt(row['rss_mb'], '.0f')} | {_fmt(row['wer'])} | {row['windows'] or '-'} | {_fmt(row['speedup'], '.2f')}x |"
        )
    lines += ["", "WER of the same clips transcribed one by one (default variant): "
              + ", ".join(f"{s:.0f} s: {w:.1f}%" for s, w in sorted(clip_wer.items())), ""]  # fmt: skip
    if stages:
        lines += ["## Stages (one 30 s window, in process, median)", "",
                  "| variant | audio tower ms/window | prefill tokens | prefill ms | frame-level prefill tokens | frame-level prefill ms "
                  "| first token ms | decode tokens/s | LLM weights MB/token | weights read GB/s (limit: copy bandwidth) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        bw = meta.get("bandwidth_gbs")
        for name, s in stages.items():
            lines.append(
                f"| {name} | {s['audio_tower_ms_per_window']} | {s['prefill_tokens']} | {s['prefill_ms']} | "
                f"{s['frame_prefill_tokens']} | {s['frame_prefill_ms']} | {s['ttft_ms']} | {s['decode_tokens_per_s']} | "
                f"{s['llm_weight_mb_per_token']} | {s['decode_weight_gbs']} ({_fmt(bw)}) |"
            )
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> bool:
    """Wall time and peak RSS against audio length, one line per system; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    systems = sorted({s for s, _ in table})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in systems:
        pts = sorted((sec, row) for (s, sec), row in table.items() if s == system)
        xs = [p[0] for p in pts]
        style = dict(marker="o", linestyle="--" if system == PEER else "-", linewidth=2 if system == PEER else 1.2)
        ax_t.plot(xs, [p[1]["wall_s"] for p in pts], label=system, **style)
        ax_m.plot(xs, [p[1]["rss_mb"] for p in pts], label=system, **style)
    for ax, title, unit in ((ax_t, "whole-process wall time", "s"), (ax_m, "peak RSS", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
