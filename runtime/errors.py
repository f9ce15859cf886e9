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


class AudioWarning(UserWarning):
    """The audio was read but is not all there (a WAV shorter than its header says)."""


class ModelFileError(FastSLMError):
    """A model folder or bundle is missing files, altered, or for another model."""


class OptionError(FastSLMError):
    """A command-line or API option is out of range or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command writes a folder: unwinds like Ctrl-C so the stage is removed."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a terminated process


@contextmanager
def reported_in_one_line(tool: str, interrupted: str = "interrupted") -> Iterator[None]:
    """For a command's body: a FastSLMError becomes `tool: error: message` on stderr and its exit
    code, Ctrl-C becomes `interrupted` and 130; anything else keeps its traceback (a real bug).
    An AudioWarning is printed as one `tool: warning: message` line."""
    import warnings

    import typer

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AudioWarning):
            typer.echo(f"{tool}: warning: {' '.join(str(message).split())}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    shown = warnings.showwarning
    try:
        warnings.showwarning = one_line_warning
        yield
    except FastSLMError as exc:
        typer.echo(f"{tool}: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        typer.echo(f"{tool}: error: {interrupted.replace('interrupted', 'terminated', 1)}", err=True)
        raise typer.Exit(Terminated.exit_code) from None
    except KeyboardInterrupt:
        typer.echo(f"{tool}: error: {interrupted}", err=True)
        raise typer.Exit(130) from None
    finally:
        warnings.showwarning = shown
