"""User-facing errors.

Every failure a user can cause (bad audio, missing or mismatched model files, absurd
options) raises a `FastSLMError` whose message is one line that says what went wrong and
what to do. The command-line tools print that line and exit non-zero; nothing else is
caught, so a real bug still shows its traceback.
"""

from __future__ import annotations


class FastSLMError(Exception):
    """An error the user can fix; its message is a single actionable line."""

    exit_code = 2


class AudioError(FastSLMError):
    """The audio could not be read or is unusable (missing, corrupt, empty, NaN)."""


class ModelFileError(FastSLMError):
    """A model folder or bundle is missing files, altered, or for another model."""


class OptionError(FastSLMError):
    """A command-line or API option is out of range or inconsistent."""
