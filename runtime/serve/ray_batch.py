"""Batch inference over a folder of recordings on Ray Data: one JSON per recording, resumable.

    fastslm-ray-batch recordings/ --out answers/ --replicas 4

    recordings/a/x.flac -> answers/a/x.json   (the record `fastslm-run --json` prints: for
                                               transcription, the segments and skipped spans too)

Each replica is a Ray Data actor holding one Pipeline; it writes a recording's JSON the moment
the answer is done (to a temporary name, then renamed), so a crash or Ctrl-C loses only the
recordings in progress. Run the same command again and it skips every recording whose JSON
exists. A recording that fails (unreadable, too long) gets no JSON and one error line, so it is
tried again next time. On a multi-node cluster the folder, --out and the model must be paths
every node sees (a shared file system).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .. import subtitles
from ..errors import FastSLMError, OptionError, reported_in_one_line, run_cli
from ..output_folder import PARTIAL_SUFFIX, written_whole
from ..prompt import Task, resolve_task
from ..transcribe import TranscribeOptions, transcribe

# What libsndfile reads (runtime.audio); anything else in the folder is not a recording.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".aif", ".aiff", ".au", ".caf", ".w64")


@dataclass(frozen=True)
class BatchOptions:
    folder: Path
    out: Path
    model: str | None = None
    prompt: str = "transcribe"
    backend: str = "auto"
    precision: str = "auto"
    replicas: int = 1  # Ray Data actors, each with its own Pipeline
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if not self.folder.is_dir():
            raise OptionError(f"{self.folder} is not a folder: pass the folder that holds the recordings")
        if self.out.exists() and not self.out.is_dir():
            raise OptionError(f"--out {self.out} is a file: pass a folder for the JSON files")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise OptionError(f"--replicas {self.replicas!r} is invalid: use a whole number >= 1")
        if not self.cpus_per_replica > 0:
            raise OptionError(f"--cpus-per-replica {self.cpus_per_replica!r} is invalid: use a positive number")


@dataclass
class Plan:
    todo: list[tuple[Path, Path]]  # (recording, its JSON)
    done: int  # recordings whose JSON already exists


def plan(options: BatchOptions) -> Plan:
    """Every recording under the folder and where its JSON goes; the ones with a JSON are done."""
    recordings = sorted(p for p in options.folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not recordings:
        raise OptionError(f"{options.folder} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    targets: dict[Path, Path] = {}
    for audio in recordings:
        target = options.out / audio.relative_to(options.folder).with_suffix(".json")
        if target in targets:
            raise OptionError(f"{targets[target]} and {audio} would both write {target}; rename one")
        targets[target] = audio
    for stale in options.out.rglob(f".*.json.*{PARTIAL_SUFFIX}") if options.out.is_dir() else ():
        stale.unlink(missing_ok=True)  # a write cut short by a crash; its recording is redone
    todo = [(audio, target) for target, audio in targets.items() if not target.is_file()]
    return Plan(todo, len(recordings) - len(todo))


def write_json(path: Path, record: dict) -> None:
    """The whole file or none: written beside `path` under a hidden name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


class RecordingWriter:
    """A Ray Data actor: answers the prompt about each recording of a batch and writes its JSON."""

    def __init__(self, model: str | None, backend: str, precision: str, prompt: str, threads: int):
        from ..generate import Pipeline

        self.pipe = Pipeline.load(model, backend, precision, threads=threads)
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        errors = []
        for audio, target in zip(batch["audio"], batch["out"]):
            try:
                write_json(Path(target), self.record(Path(audio)))
                errors.append("")
            except FastSLMError as exc:
                errors.append(str(exc))
        return {"audio": list(batch["audio"]), "error": errors}

    def record(self, audio: Path) -> dict:
        """What `fastslm-run --json` prints for this recording and prompt."""
        fields = {"audio": str(audio), "prompt": self.prompt, "model": self.pipe.model_name,
                  "backend": self.pipe.backend.name}  # fmt: skip
        if resolve_task(self.prompt)[0] == Task.ASR:  # any length, segment by segment
            transcript = transcribe(self.pipe, audio, TranscribeOptions(prompt=self.prompt))
            return subtitles.record(transcript, **fields, windows=len(transcript.segments),
                                    answer_tokens=sum(len(s.token_ids) for s in transcript.segments))  # fmt: skip
        result = self.pipe.generate(audio, self.prompt)
        return {**fields, "text": result.text, "audio_seconds": round(result.audio_seconds, 3),
                "windows": result.n_windows, "prompt_tokens": result.prompt_tokens,
                "answer_tokens": len(result.token_ids)}  # fmt: skip


@dataclass
class BatchReport:
    written: int
    skipped: int  # already had their JSON
    failed: list[tuple[str, str]]  # (recording, error line)


def run_batch(options: BatchOptions) -> BatchReport:
    import ray

    from .ray_app import join_or_start_ray

    work = plan(options)
    if not work.todo:
        return BatchReport(0, work.done, [])
    join_or_start_ray()
    model = str(Path(options.model).absolute()) if options.model else None
    items = [{"audio": str(audio.absolute()), "out": str(target.absolute())} for audio, target in work.todo]
    results = ray.data.from_items(items).map_batches(
        RecordingWriter,
        fn_constructor_kwargs={"model": model, "backend": options.backend, "precision": options.precision,
                               "prompt": options.prompt,
                               "threads": max(1, int(options.cpus_per_replica))},  # fmt: skip
        batch_size=1,  # one recording at a time, so each JSON is written as soon as it is done
        concurrency=options.replicas,
        num_cpus=options.cpus_per_replica,
    )
    written, failed = 0, []
    for row in results.iter_rows():
        if row["error"]:
            failed.append((row["audio"], row["error"]))
        else:
            written += 1
    return BatchReport(written, work.done, failed)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def batch(
    folder: Annotated[Path, typer.Argument(help="Folder of recordings (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder for the JSON files (mirrors the recordings' folders).")],
    model: Annotated[Optional[Path], typer.Option(help="Bundle or model folder [default: shipped demo].")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help='"transcribe", "summarize", or a question.')] = "transcribe",
    backend: Annotated[str, typer.Option(help="auto, onnx, tensorrt or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (as fastslm-run), fp32, fp16, int8 or int4.")] = "auto",
    replicas: Annotated[int, typer.Option(help="Ray Data actors, each with its own model.")] = 1,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs per actor (its ONNX Runtime threads).")] = 1.0,
) -> None:
    with reported_in_one_line("fastslm-ray-batch"):
        options = BatchOptions(folder, out, str(model) if model else None, prompt, backend, precision, replicas,
                               cpus_per_replica)  # fmt: skip
        report = run_batch(options)
        for audio, error in report.failed:
            typer.echo(f"fastslm-ray-batch: error: {audio}: {error}", err=True)
        typer.echo(f"fastslm-ray-batch: {report.written} written, {report.skipped} already done, "
                   f"{len(report.failed)} failed -> {out}", err=True)  # fmt: skip
        if report.failed:
            raise typer.Exit(2)


def main() -> None:
    run_cli(app, "fastslm-ray-batch")


if __name__ == "__main__":
    main()
