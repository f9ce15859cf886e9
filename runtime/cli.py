"""`fastslm-run`: answer a prompt about one or more recordings, streaming the answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import AudioError, FastSLMError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"fastslm-run: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    audio: Annotated[list[Path], typer.Argument(help="Audio files (any format libsndfile reads).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help='"transcribe", "summarize", or a question.')] = "transcribe",
    model: Annotated[Optional[Path], typer.Option(help="Model folder or exported bundle [default: shipped demo].")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per file instead of streamed text.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many answer tokens.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy; the reference FastSLM samples at 0.2.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = 20,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    language: Annotated[Optional[str], typer.Option(help="Language token: en or ko.")] = None,
    providers: Annotated[Optional[str], typer.Option(
        help="onnx backend: execution providers in order, e.g. CUDAExecutionProvider,CPUExecutionProvider "
        "[default: the best available].")] = None,
) -> None:
    try:
        from .generate import Pipeline
        from .loading import DEFAULT_MODEL_NOTE
        from .sampling import SamplingOptions

        sampling = SamplingOptions(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
        )
        pipe = Pipeline.load(model, backend, providers=providers)
        note = f" ({DEFAULT_MODEL_NOTE})" if model is None else ""
        where = getattr(pipe.backend, "providers", None)
        where = f" ({', '.join(where)})" if where else ""
        typer.echo(f"fastslm-run: model {pipe.model_name} on {pipe.backend.name}{where}{note}", err=True)
        failed = 0
        for path in audio:
            try:
                answer_one(pipe, path, prompt, sampling, language, json_output, several=len(audio) > 1)
            except AudioError as exc:
                # One unreadable file should not cost the answers for the others.
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                typer.echo(f"fastslm-run: error: {message}", err=True)
                failed += 1
        if failed:
            raise typer.Exit(2)
    except FastSLMError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def backend_max_context(backend) -> int | None:
    """The LLM's context length (max_position_embeddings), where the backend tells it."""
    if getattr(backend, "max_context", None):
        return int(backend.max_context)
    config = getattr(getattr(backend, "model", None), "config", None)  # the PyTorch reference
    return getattr(getattr(config, "qwen3", None), "max_position_embeddings", None)


def check_fits_context(pipe, path: Path, prompt: str, language, max_new_tokens: int) -> None:
    """Fail before reading any samples when the recording cannot fit the LLM's context.

    The file header gives the duration for free; decoding a 10 h file, its log-mel and 1200
    windows of speech tokens would take minutes and gigabytes only to overflow the context.
    """
    import soundfile as sf

    from .audio import SAMPLE_RATE, WINDOW_SECONDS, window_count
    from .errors import OptionError
    from .prompt import build_prompt, resolve_task

    max_context = backend_max_context(pipe.backend)
    try:
        info = sf.info(str(path))
    except Exception:  # unreadable or missing: pipe.encode reports it with the proper one-line error
        return
    if max_context is None or info.samplerate <= 0:
        return
    seconds = info.frames / info.samplerate
    per_window = pipe.backend.tokens_per_window
    speech = window_count(int(seconds * SAMPLE_RATE)) * per_window
    task, instruction = resolve_task(prompt)
    text = len(pipe.tokenizer.encode_prompt(build_prompt(task, instruction, language=language)))
    if speech + text + max_new_tokens <= max_context:
        return
    room = (max_context - text - max_new_tokens) // per_window  # whole windows that still fit
    if room < 1:
        raise OptionError(
            f"--max-new-tokens {max_new_tokens} leaves no room for audio in the model's {max_context}-token context; lower it"
        )
    length = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
    raise AudioError(
        f"{path} is {length}: {speech} speech tokens + {text} prompt + {max_new_tokens} answer tokens exceed the "
        f"model's {max_context}-token context; split the audio into parts of at most {room * WINDOW_SECONDS / 60:.0f} min"
    )


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
