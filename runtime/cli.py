"""`fastslm-run`: answer a prompt about one or more recordings, streaming the answer."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import AudioError, CacheFileError, reported_in_one_line, run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
STDIN = Path("-")


@app.command()
def run(
    audio: Annotated[list[Path], typer.Argument(
        help="Audio files (any format libsndfile reads), or - for raw PCM on stdin (see --input-format).")],
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help='"transcribe", "summarize", or a question; repeat it to ask several '
        "(the recording is encoded once for all questions). [default: transcribe]")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model folder or exported bundle [default: shipped demo].")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per file instead of streamed text (= --format json).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="txt, json, srt or vtt (transcription; others answer in txt or json).")] = "txt",
    output_dir: Annotated[Optional[Path], typer.Option(help="Also write NAME.txt/.json/.srt/.vtt of each transcribed file here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Let --output-dir replace existing files.")] = False,
    # The decoding options default to what the model's config.json recommends ("decoding"), else to greedy
    # with these values; one given option replaces only itself (SamplingOptions.replaced).
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="Stop after this many answer tokens (per segment when transcribing). [default: the model's, else 512]")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="0 = greedy or beam search; the reference FastSLM samples at 0.2. [default: the model's, else 0]")] = None,
    top_k: Annotated[Optional[int], typer.Option(
        help="Sample among the k most likely tokens (0 = off). [default: the model's, else 20]")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold. [default: the model's, else 0.95]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    beam_size: Annotated[Optional[int], typer.Option(
        help="Search this many hypotheses and answer the most likely (Whisper's beam search; temperature 0). "
        "1 = greedy. [default: the model's, else 1]")] = None,
    language: Annotated[Optional[str], typer.Option(help="Language token: en or ko.")] = None,
    precision: Annotated[str, typer.Option(
        help="auto (the fastest variant that passes the accuracy gates on this machine), fp32, fp16, int8 or int4.")] = "auto",
    providers: Annotated[Optional[str], typer.Option(
        help="onnx backend: execution providers in order, e.g. CUDAExecutionProvider,CPUExecutionProvider "
        "[default: the best available].")] = None,
    cache: Annotated[bool, typer.Option(
        "--cache", help="Keep each recording's encoded audio prefix next to it (FILE.fastslm-cache.npz) for questions: "
        "load it when present, save it otherwise; a cache for other audio or another model is refused.")] = False,
    input_rate: Annotated[int, typer.Option(help="Sample rate of raw PCM on stdin (audio -), in Hz.")] = 16000,
    input_format: Annotated[str, typer.Option(help="Raw PCM sample format on stdin (ffmpeg's names): u8, s16le, s24le, s32le, f32le or f64le.")] = "s16le",
    input_channels: Annotated[int, typer.Option(help="Interleaved channels of raw PCM on stdin.")] = 1,
) -> None:
    with reported_in_one_line("fastslm-run"), ExitStack() as closing:
        from .errors import OptionError
        from .generate import Pipeline
        from .loading import DEFAULT_MODEL_NOTE
        from .prompt import Task, resolve_task
        from .sampling import SamplingOptions
        from .subtitles import FORMATS, check_outputs

        from .streaming import PCM_FORMATS

        prompts = prompt or ["transcribe"]
        if any(not p.strip() for p in prompts):  # an empty shell variable, most likely; not a silent transcription
            raise OptionError('--prompt is empty: give "transcribe", "summarize" or a question (no -p transcribes)')
        fmt = "json" if json_output else output_format
        if fmt not in FORMATS:
            raise OptionError(f"--format {output_format!r} is unknown; choose one of {', '.join(FORMATS)}")
        questions = [p for p in prompts if resolve_task(p)[0] != Task.ASR]
        if questions and (fmt in ("srt", "vtt") or output_dir is not None):
            raise OptionError(
                f"--format {fmt} and --output-dir are for transcription; drop them for the prompt {questions[0]!r}"
            )
        if audio.count(STDIN) > 1:
            raise OptionError("stdin (-) can be read once: give - at most once")
        if STDIN in audio and (cache or output_dir is not None):
            raise OptionError("--cache and --output-dir write next to or named after a recording file; stdin (-) has none")
        if input_format not in PCM_FORMATS:
            raise OptionError(f"unknown --input-format {input_format!r}: use one of {', '.join(PCM_FORMATS)}")
        from .audio import MAX_CHANNELS, MAX_RATE, MIN_RATE

        if not MIN_RATE <= input_rate <= MAX_RATE:
            raise OptionError(f"--input-rate {input_rate} is invalid: give the raw audio's rate in Hz, {MIN_RATE}..{MAX_RATE}")
        if not 1 <= input_channels <= MAX_CHANNELS:
            raise OptionError(f"--input-channels {input_channels} is invalid: give the raw audio's channels, 1..{MAX_CHANNELS}")
        if output_dir is not None:
            check_outputs(output_dir, list(audio), overwrite)
        chosen = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
                      beam_size=beam_size)  # fmt: skip
        SamplingOptions().replaced(**chosen)  # a bad option fails before the model loads
        pipe = closing.enter_context(Pipeline.load(model, backend, precision, providers=providers))  # TensorRT saves its cache on close
        sampling = pipe.sampling.replaced(**chosen)
        note = f" ({DEFAULT_MODEL_NOTE})" if model is None else ""
        where = getattr(pipe.backend, "providers", None)
        where = f" ({', '.join(where)})" if where else ""
        typer.echo(f"fastslm-run: model {pipe.model_name} on {pipe.variant}{where}, {decoding_text(sampling)}{note}", err=True)
        raw_input = RawInput(input_rate, input_format, input_channels)
        failed = 0
        for path in audio:
            try:
                several = len(audio) > 1
                # Transcription goes segment by segment at the recording's pauses (transcribe); questions
                # share one encoding of the recording (session). Raw PCM on stdin is one stream: a session.
                if path != STDIN:
                    for p in prompts:
                        if p not in questions:
                            transcribe_one(pipe, path, p, sampling, language, fmt, output_dir, several, len(prompts) > 1)
                asked = prompts if path == STDIN else questions
                if asked:
                    answer_one(pipe, path, asked, sampling, language, fmt == "json", several, cache, raw_input,
                               titled=len(prompts) > 1)
            except (AudioError, CacheFileError) as exc:
                # One unreadable file should not cost the answers for the others.
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                typer.echo(f"fastslm-run: error: {message}", err=True)
                if fmt == "json":  # a program reading the stream sees a record for every input
                    typer.echo(json.dumps({"audio": str(path), "error": str(exc)}, ensure_ascii=False))
                failed += 1
        if failed:
            raise typer.Exit(2)


def decoding_text(sampling) -> str:
    """How the answers will be decoded, for the banner."""
    if sampling.beam_size > 1:
        return f"beam search {sampling.beam_size}"
    return "greedy" if sampling.greedy else f"sampling at temperature {sampling.temperature:g}"


@dataclass(frozen=True)
class RawInput:
    """How to read raw PCM from stdin."""

    rate: int
    format: str
    channels: int


def check_fits_context(pipe, path: Path, prompt: str, language, max_new_tokens: int) -> None:
    """Fail before reading any samples when the recording is too long to answer at all.

    The file header gives the duration for free; decoding a 10 h file, its log-mel and 1200
    windows of speech tokens would take minutes and gigabytes only to be refused.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # unreadable or missing: pipe.open reports it with the proper one-line error
        return
    if info.samplerate > 0:
        pipe.check_answerable(info.frames / info.samplerate, prompt, language, max_new_tokens, source=str(path))


def open_recording(pipe, path: Path, prompts: list[str], language, max_new_tokens: int, use_cache: bool,
                   raw_input: RawInput):
    """An AudioSession for a file (from its saved cache when there is one) or for PCM streamed on stdin."""
    from tqdm import tqdm

    from .prefix_cache import cache_path_for

    if path == STDIN:
        return read_stdin(pipe, prompts, language, raw_input)
    for prompt in prompts:
        check_fits_context(pipe, path, prompt, language, max_new_tokens)
    with tqdm(desc=f"encoding {path.name}", unit="window", leave=False, disable=None, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return pipe.open(path, cache=cache_path_for(path) if use_cache else None, progress=progress)


def read_stdin(pipe, prompts: list[str], language, raw_input: RawInput):
    """Encode and prefill PCM from stdin window by window while it arrives; the session once it ends."""
    from .streaming import PCM_FORMATS, pcm_from_bytes

    live = pipe.open_stream(prepare=prompts, language=language, sample_rate=raw_input.rate)
    frame = PCM_FORMATS[raw_input.format] * raw_input.channels
    block = frame * max(1, raw_input.rate // 10)  # about 0.1 s per read: small enough to follow a live source
    pending = b""
    stream = sys.stdin.buffer
    while chunk := stream.read1(block) if hasattr(stream, "read1") else stream.read(block):
        pending += chunk
        whole = len(pending) - len(pending) % frame
        if whole:
            live.feed(pcm_from_bytes(pending[:whole], raw_input.format, raw_input.channels))
            pending = pending[whole:]
    if pending:
        pcm_from_bytes(pending, raw_input.format, raw_input.channels)  # raises: a partial sample frame at the end
    return live.finish()


def answer_one(pipe, path: Path, prompts: list[str], sampling, language, json_output: bool, several: bool,
               use_cache: bool = False, raw_input: RawInput = RawInput(16000, "s16le", 1), titled: bool = False) -> None:
    """Questions about one recording, encoded once (or loaded from its cache); answers streamed or as JSON."""
    from .beyond_context import describe
    from .prefix_cache import cache_path_for

    session = open_recording(pipe, path, prompts, language, sampling.max_new_tokens, use_cache, raw_input)
    for prompt in prompts:
        if not session.fits(prompt, language, sampling.max_new_tokens):
            typer.echo(f"fastslm-run: {describe(session, prompt, language, sampling.max_new_tokens)}", err=True)
        if json_output:
            result = session.ask(prompt, sampling=sampling, language=language)
            typer.echo(json.dumps(json_record(pipe, path, prompt, result), ensure_ascii=False))
            continue
        title(path, prompt, several, titled)
        for piece in session.stream(prompt, sampling=sampling, language=language):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if use_cache and set(session.prefixes) != set(session.loaded_prefixes):
        session.save(cache_path_for(path))


def json_record(pipe, path: Path, prompt: str, result) -> dict:
    record = {
        "audio": str(path),
        "prompt": prompt,
        "text": result.text,
        **({"thinking": result.thinking} if result.thinking else {}),
        "audio_seconds": round(result.audio_seconds, 3),
        "windows": result.n_windows,
        "prompt_tokens": result.prompt_tokens,
        "answer_tokens": len(result.token_ids),
        "model": pipe.model_name,
        "backend": pipe.backend.name,
        "timings": {name: round(seconds, 4) for name, seconds in result.timings.items()},
    }
    if result.strategy:
        record["strategy"] = result.strategy
        record["parts"] = result.parts
    return record


def title(path: Path, prompt: str, several: bool, titled: bool) -> None:
    """The line before an answer when there are several files (== FILE) or prompts (== [PROMPT])."""
    if several or titled:
        typer.echo("== " + " ".join(([str(path)] if several else []) + ([f"[{prompt}]"] if titled else [])))


def transcribe_one(pipe, path: Path, prompt: str, sampling, language, fmt: str, output_dir: Path | None,
                   several: bool, titled: bool = False) -> None:
    """Segment by segment, each printed (txt, srt, vtt) as soon as it is decoded; json prints one record at the end."""
    from tqdm import tqdm

    from .subtitles import cue, header, record, write_outputs
    from .transcribe import Transcriber, TranscribeOptions

    options = TranscribeOptions(sampling=sampling, language=language, prompt=prompt)
    transcriber = Transcriber(pipe, path, options)
    if fmt != "json":
        title(path, prompt, several, titled)
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
