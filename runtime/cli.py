"""`fastslm-run`: answer a prompt about one or more recordings, streaming the answer."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import AudioError, reported_in_one_line, run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def run(
    audio: Annotated[list[Path], typer.Argument(help="Audio files (any format libsndfile reads).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help='"transcribe", "summarize", or a question.')] = "transcribe",
    model: Annotated[Optional[Path], typer.Option(help="Model folder or exported bundle [default: shipped demo].")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per file instead of streamed text (= --format json).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="txt, json, srt or vtt (transcription; others answer in txt or json).")] = "txt",
    output_dir: Annotated[Optional[Path], typer.Option(help="Also write NAME.txt/.json/.srt/.vtt of each transcribed file here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Let --output-dir replace existing files.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many answer tokens (per segment when transcribing).")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy; the reference FastSLM samples at 0.2.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = 20,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    language: Annotated[Optional[str], typer.Option(help="Language token: en or ko.")] = None,
    precision: Annotated[str, typer.Option(
        help="auto (the fastest variant that passes the accuracy gates on this machine), fp32, fp16, int8 or int4.")] = "auto",
    providers: Annotated[Optional[str], typer.Option(
        help="onnx backend: execution providers in order, e.g. CUDAExecutionProvider,CPUExecutionProvider "
        "[default: the best available].")] = None,
) -> None:
    with reported_in_one_line("fastslm-run"), ExitStack() as closing:
        from .errors import OptionError
        from .generate import Pipeline
        from .loading import DEFAULT_MODEL_NOTE
        from .prompt import Task, resolve_task
        from .sampling import SamplingOptions
        from .subtitles import FORMATS, check_outputs

        fmt = "json" if json_output else output_format
        if fmt not in FORMATS:
            raise OptionError(f"--format {output_format!r} is unknown; choose one of {', '.join(FORMATS)}")
        transcribing = resolve_task(prompt)[0] == Task.ASR
        if not transcribing and (fmt in ("srt", "vtt") or output_dir is not None):
            raise OptionError(f"--format {fmt} and --output-dir are for transcription; drop them for the prompt {prompt!r}")
        if output_dir is not None:
            check_outputs(output_dir, list(audio), overwrite)
        sampling = SamplingOptions(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
        )
        pipe = closing.enter_context(Pipeline.load(model, backend, precision, providers=providers))  # TensorRT saves its cache on close
        note = f" ({DEFAULT_MODEL_NOTE})" if model is None else ""
        where = getattr(pipe.backend, "providers", None)
        where = f" ({', '.join(where)})" if where else ""
        typer.echo(f"fastslm-run: model {pipe.model_name} on {pipe.variant}{where}{note}", err=True)
        failed = 0
        for path in audio:
            try:
                if transcribing:
                    transcribe_one(pipe, path, prompt, sampling, language, fmt, output_dir, several=len(audio) > 1)
                else:
                    answer_one(pipe, path, prompt, sampling, language, fmt == "json", several=len(audio) > 1)
            except AudioError as exc:
                # One unreadable file should not cost the answers for the others.
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                typer.echo(f"fastslm-run: error: {message}", err=True)
                if fmt == "json":  # a program reading the stream sees a record for every input
                    typer.echo(json.dumps({"audio": str(path), "error": str(exc)}, ensure_ascii=False))
                failed += 1
        if failed:
            raise typer.Exit(2)


def check_fits_context(pipe, path: Path, prompt: str, language, max_new_tokens: int) -> None:
    """Fail before reading any samples when the recording cannot fit the LLM's context.

    The file header gives the duration for free; decoding a 10 h file, its log-mel and 1200
    windows of speech tokens would take minutes and gigabytes only to overflow the context.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # unreadable or missing: pipe.encode reports it with the proper one-line error
        return
    if info.samplerate > 0:
        pipe.check_context(info.frames / info.samplerate, prompt, language, max_new_tokens, source=str(path))


def answer_one(pipe, path: Path, prompt: str, sampling, language, json_output: bool, several: bool) -> None:
    from tqdm import tqdm

    check_fits_context(pipe, path, prompt, language, sampling.max_new_tokens)

    with tqdm(desc=f"encoding {path.name}", unit="window", leave=False, disable=None, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        speech = pipe.encode(path, progress=progress)
    if json_output:
        result = pipe.generate(speech, prompt, sampling=sampling, language=language)
        record = {
            "audio": str(path),
            "prompt": prompt,
            "text": result.text,
            "audio_seconds": round(result.audio_seconds, 3),
            "windows": result.n_windows,
            "prompt_tokens": result.prompt_tokens,
            "answer_tokens": len(result.token_ids),
            "model": pipe.model_name,
            "backend": pipe.backend.name,
        }
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    if several:
        typer.echo(f"== {path}")
    for piece in pipe.stream(speech, prompt, sampling=sampling, language=language):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def transcribe_one(pipe, path: Path, prompt: str, sampling, language, fmt: str, output_dir: Path | None,
                   several: bool) -> None:
    """Segment by segment, each printed (txt, srt, vtt) as soon as it is decoded; json prints one record at the end."""
    from tqdm import tqdm

    from .subtitles import cue, header, record, write_outputs
    from .transcribe import Transcriber, TranscribeOptions

    options = TranscribeOptions(sampling=sampling, language=language, prompt=prompt)
    transcriber = Transcriber(pipe, path, options)
    if several and fmt != "json":
        typer.echo(f"== {path}")
    if fmt != "json":
        sys.stdout.write(header(fmt))
    shown = 0
    total = transcriber.reader.seconds or None
    with tqdm(desc=f"transcribing {path.name}", total=total and round(total, 1), unit="s audio", leave=False,
              disable=None, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s") as bar:  # fmt: skip
        for segment in transcriber.segments():
            bar.n = segment.end
            bar.refresh()
            if fmt != "json" and segment.text.strip():
                shown += 1
                bar.clear()
                sys.stdout.write(cue(fmt, shown, segment))
                sys.stdout.flush()
    transcript = transcriber.transcript()
    fields = {"audio": str(path), "prompt": prompt, "model": pipe.model_name, "backend": pipe.backend.name,
              "windows": len(transcript.segments),  # one audio-tower window per segment
              "answer_tokens": sum(len(s.token_ids) for s in transcript.segments)}
    if fmt == "json":
        typer.echo(json.dumps(record(transcript, **fields), ensure_ascii=False))
    if output_dir is not None:
        write_outputs(output_dir, path, transcript, **fields)


def main() -> None:
    run_cli(app, "fastslm-run")


if __name__ == "__main__":
    main()
