"""fastslm-bench's bookkeeping (issue #15): paired ratios, summaries, the report; no timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

from fastslm.runtime.bench.report import markdown, paired_speedup, plot, summary
from fastslm.runtime.bench.runs import PEER, RunResult, System


def run(system, repeat, wall, rss=100.0, seconds=600.0):
    return RunResult(system, seconds, repeat, wall, rss, "text", 20 if system != PEER else None)


def test_speedup_pairs_runs_of_the_same_repeat():
    runs = [run("fastslm default", 0, 10.0), run(PEER, 0, 30.0), run("fastslm default", 1, 20.0), run(PEER, 1, 20.0),
            run("fastslm default", 2, 5.0)]  # repeat 2 has no peer run: not paired, not counted
    assert paired_speedup(runs, "fastslm default", 600.0) == 2.0  # median of 3.0 and 1.0
    table = summary(runs, {("fastslm default", 600.0): 31.5})
    row = table[("fastslm default", 600.0)]
    assert row["wall_s"] == 10.0 and row["repeats"] == 3 and row["wer"] == 31.5 and row["speedup"] == 2.0
    assert table[(PEER, 600.0)]["speedup"] is None
    failed = RunResult("fastslm default", 600.0, 3, 1.0, math.nan, "", None, "exit 2")
    assert summary(runs + [failed], {})[("fastslm default", 600.0)]["repeats"] == 3


def test_report_and_plot(tmp_path):
    runs = [run("fastslm default", 0, 10.0, 300), run(PEER, 0, 30.0, 700), run("fastslm default", 0, 50.0, 310, 3600.0),
            run(PEER, 0, 170.0, 900, 3600.0)]
    table = summary(runs, {})
    meta = {"machine": "m", "date": "d", "command": "fastslm-bench", "default": "onnx fp32"}
    text = markdown(meta, table, {}, {600.0: 30.0}, ["a goal line"])
    assert "| fastslm default | 600 | 1 | 10.00 | 0.0167 | 300 |" in text and "3.00x" in text and "- a goal line" in text
    assert plot(table, tmp_path / "b.png") is False or (tmp_path / "b.png").stat().st_size > 1000


def test_systems_are_separate_processes():
    audio = Path("x.flac")
    peer = System(PEER).command(audio)
    ours = System("fastslm onnx-fp32", model=Path("b")).command(audio)
    assert peer[1:3] == ["-m", "fastslm.runtime.bench.peer"] and ours[1:3] == ["-m", "fastslm.runtime.cli"]
    assert ours[ours.index("--model") + 1] == "b" and ours[-1] == "x.flac"
    assert ours[ours.index("--beam-size") + 1] == "1"  # greedy, like the peer, whatever the model recommends


def test_docs_section_is_replaced_and_the_rest_kept(tmp_path):
    from fastslm.runtime.bench.cli import write_docs_section

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other work\n\nkept\n")
    write_docs_section(doc, "## Transcription\n\nfirst\n")
    write_docs_section(doc, "## Transcription\n\nsecond\n")
    text = doc.read_text()
    assert "kept" in text and "second" in text and "first" not in text and text.count("## Transcription") == 1
