"""Write a folder the safe way: stage it next to `--out`, publish it by renaming, lose nothing.

Every command that writes a folder (fastslm-export, fastslm-convert, fastslm-calibrate) goes
through `OutputFolder`:

    with OutputFolder(out, force, protect=[model_dir]) as stage:   # checks --out, makes the stage
        ... write files into stage.path ...
        stage.publish()                                            # rename into place

- `--out` is checked when the `with` starts, before any slow work: a path under a file, in
  /proc, or in a folder that cannot be written is one error line, not a traceback after a
  minute of exporting.
- A non-empty `--out` is replaced only with `force`, and only when fastslm wrote it (its
  manifest / config / calibration record carries one of our formats). Anything else is
  refused whatever the flag: `--force` must never delete a user's photos.
- The stage is a hidden `.NAME.XXXX.partial` folder beside `--out` (same file system, so
  publishing is a rename). It is removed on any failure, Ctrl-C and SIGTERM. A stage left by
  a process that was killed outright (SIGKILL, power loss) is removed by the next write to the
  same `--out`: each stage's name holds its owner's pid, and one whose owner is gone is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from .bundle import (
    BUNDLE_FORMAT, CALIBRATION_FILE, CALIBRATION_FORMAT, CONFIG_FILE, MANIFEST_FILE, MODEL_FORMAT,
)  # fmt: skip
from .errors import OptionError, Terminated

# What every half-written folder or file is named with until it is complete (.NAME.PID.XXXX.partial for
# folders, .NAME.XXXX.partial for files): a crash leaves nothing under the final name.
PARTIAL_SUFFIX = ".partial"

# The files that say "fastslm wrote this folder", and the "format" each must hold.
_OWN_FORMATS = {MANIFEST_FILE: BUNDLE_FORMAT, CONFIG_FILE: MODEL_FORMAT, CALIBRATION_FILE: CALIBRATION_FORMAT}


def written_by_fastslm(folder: Path) -> bool:
    """Whether `folder` is a bundle, model folder or calibration folder (by its own record)."""
    for name, fmt in _OWN_FORMATS.items():
        try:
            if json.loads((folder / name).read_text()).get("format") == fmt:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


class OutputFolder:
    """Stage a folder beside `out` and publish it there; see the module docstring for the rules."""

    def __init__(self, out: str | Path, force: bool = False, *, protect: Iterable[str | Path] = (),
                 flag: str = "--out") -> None:  # fmt: skip
        self.out = Path(out).absolute()
        self.force = force
        self.protect = [Path(p) for p in protect]
        self.flag = flag
        self.path: Path | None = None  # the stage, once entered
        self._made_parents: list[Path] = []
        self._previous_sigterm = None

    # ---- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse an `out` that cannot or must not be written, without touching anything."""
        out, flag = self.out, self.flag
        for parent in reversed(out.parents):
            if parent.exists() and not parent.is_dir():
                raise OptionError(f"{flag} {out} lies under {parent}, which is a file; choose a folder path")
        if out.exists() and not out.is_dir():
            raise OptionError(f"{flag} {out} is a file; give a folder path")
        for kept in self.protect:
            kept = kept.resolve()
            if out.resolve() == kept or kept.is_relative_to(out.resolve()):
                raise OptionError(f"{flag} {out} would replace {kept}, which this command reads; choose another folder")
        if out.is_dir() and any(out.iterdir()):
            if not written_by_fastslm(out):
                raise OptionError(
                    f"{flag} {out} is a non-empty folder that fastslm did not write; nothing was changed "
                    "(--force replaces only fastslm bundles, model and calibration folders): choose an empty or new folder"
                )
            if not self.force:
                raise OptionError(f"{flag} {out} exists and is not empty; pass --force to replace it")

    # ---- stage / publish ------------------------------------------------------------------

    def __enter__(self) -> "OutputFolder":
        self.check()
        self._make_parents()
        _remove_stale_stages(self.out)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=_stage_prefix(self.out), suffix=PARTIAL_SUFFIX, dir=self.out.parent))
            self.path.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs are for everyone
        except OSError as exc:
            self._discard()
            raise OptionError(
                f"cannot write {self.flag} {self.out} ({exc.strerror or exc}): choose a folder you can write"
            ) from None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def publish(self) -> Path:
        """Put the finished stage at `out`; an old `out` is moved aside first and deleted last."""
        assert self.path is not None, "publish() inside the with block"
        self.check()  # out may have changed while we worked
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
            old.rmdir()
            self.out.rename(old)
        try:
            self.path.rename(self.out)
        except OSError:
            if old is not None:
                old.rename(self.out)  # put the previous folder back
            raise
        self.path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._discard()

    def _make_parents(self) -> None:
        missing = [p for p in reversed(self.out.parents) if not p.exists()]
        for parent in missing:
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                self._discard()
                raise OptionError(
                    f"cannot create {parent} for {self.flag} {self.out} ({exc.strerror or exc}): choose a folder you can write"
                ) from None
            self._made_parents.append(parent)

    def _discard(self) -> None:
        """Remove the stage (if unpublished) and the parents this folder created (if still empty)."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        if not self.out.exists():
            for parent in reversed(self._made_parents):
                try:
                    parent.rmdir()
                except OSError:
                    break
        self._made_parents = []


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _stage_prefix(out: Path) -> str:
    return f".{out.name}.{os.getpid()}."


def _remove_stale_stages(out: Path) -> None:
    """Delete stages for `out` whose writing process no longer exists."""
    try:
        candidates = [p for p in out.parent.glob(f".{out.name}.*{PARTIAL_SUFFIX}") if p.is_dir()]
    except OSError:
        return
    for stage in candidates:
        try:
            pid = int(stage.name[len(out.name) + 2 :].split(".")[0])
        except ValueError:
            continue  # not named by this module: not provably ours
        if not _alive(pid):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or not a pid: leave it
    return True


@contextlib.contextmanager
def written_whole(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object whose contents become `path` only if the block ends without error: written to a
    hidden `.NAME.XXXX.partial` beside it and renamed over it, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        with_new_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_new_file_mode(path: str | Path) -> None:
    """Give `path` the permissions a plain open() gives a new file: `mkstemp` and onnx's external-data
    writer make files owner-only, and a bundle, subtitles or a cache are for whoever reads them."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
