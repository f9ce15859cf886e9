"""Calibration inputs: real recordings, windowed exactly as at run time, saved so a build repeats.

    recordings (files or folders) -> load_audio (16 kHz mono) -> audio_to_windows (the runtime's
    own log-mel and 30 s windows, last one padded) -> at most `max_windows` windows, spread
    evenly over the recordings -> CALIB/windows.npy + CALIB/calibration.json

A calibration folder (what `fastslm-calibrate --out` writes):

    calibration.json   {"format": "fastslm-calibration", "format_version", "created", "n_mels",
                        "model": {"name", "source"}, "windows", "sha256" (of the windows),
                        "sources": [{"path", "seconds", "windows", "peak"}], "skipped": [...]}
    windows.npy        float32 (W, n_mels, 3000) log-mel windows
    ranges.json        activation ranges of the audio tower (see ranges.py)

The default recordings are the demo recipe's calibration split: models/demo/calibration as shipped,
or CORPUS/audio/calib of the corpus FASTSLM_CORPUS names. Never the evaluation audio the accuracy
gates score, nor jfk.flac: a gate that scores audio calibration saw reports too small a loss.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from ..runtime.bundle import CALIBRATION_FILE, CALIBRATION_FORMAT
from ..runtime.errors import FastSLMError

CALIBRATION_FORMAT_VERSION = 1
WINDOWS_FILE = "windows.npy"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")
# A recording whose loudest sample stays below -60 dBFS holds no speech to calibrate on.
SILENCE_PEAK = 10 ** (-60 / 20)
DEFAULT_MAX_WINDOWS = 64


class CalibrationError(FastSLMError):
    """The calibration input is unusable: no audio, only silence, or made for another model."""


def default_corpus() -> Path:
    """FASTSLM_CORPUS (e.g. the recipe's work/corpus), else the eval subset shipped with the package."""
    from ..runtime.loading import DEMO_EVAL_SUBSET

    return Path(os.environ.get("FASTSLM_CORPUS", DEMO_EVAL_SUBSET))


def default_audio() -> list[Path]:
    """The demo recipe's calibration audio: FASTSLM_CORPUS/audio/calib, else the shipped copy ([] if neither)."""
    from ..runtime.loading import DEMO_CALIBRATION

    corpus = os.environ.get("FASTSLM_CORPUS")
    candidates = ([Path(corpus) / "audio" / "calib"] if corpus else []) + [DEMO_CALIBRATION / "audio" / "calib"]
    return [p for p in candidates if p.is_dir()][:1]


def find_audio(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for audio files (sorted); raises on nothing usable."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise CalibrationError(f"calibration audio {path} does not exist: pass audio files or folders that hold them")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise CalibrationError(
                    f"folder {path} holds no audio files ({', '.join(AUDIO_SUFFIXES[:4])}, ...): pass a folder of recordings"
                )
            files += found
        else:
            files.append(path)
    if not files:
        raise CalibrationError("no calibration audio was given: pass --audio with recordings of speech (files or folders)")
    return list(dict.fromkeys(files))  # each file once, in order


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


@dataclass
class CalibrationSet:
    windows: np.ndarray  # (W, n_mels, 3000) float32
    sources: list[dict]
    skipped: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # {"name", "source"}: what it was collected for

    @property
    def n_mels(self) -> int:
        return int(self.windows.shape[1])

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.windows).tobytes()).hexdigest()

    def subset(self, k: int) -> np.ndarray:
        """k windows spread over the set (for gates and the sensitivity pass)."""
        return self.windows[spread(len(self.windows), k)]

    def check_model(self, n_mels: int, model_name: str, where: str) -> None:
        if self.n_mels != n_mels:
            raise CalibrationError(
                f"{where} holds {self.n_mels}-bin mel windows (collected for {self.model.get('name', '?')!r}), this model "
                f"takes {n_mels}: run fastslm-calibrate --model for {model_name!r} again"
            )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / WINDOWS_FILE, np.ascontiguousarray(self.windows, dtype=np.float32))
        record = {
            "format": CALIBRATION_FORMAT,
            "format_version": CALIBRATION_FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "n_mels": self.n_mels,
            "model": self.model,
            "windows": int(len(self.windows)),
            "sha256": self.sha256,
            "sources": self.sources,
            "skipped": self.skipped,
        }
        (folder / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "CalibrationSet":
        folder = Path(folder)
        meta_file, windows_file = folder / CALIBRATION_FILE, folder / WINDOWS_FILE
        if not folder.is_dir() or not meta_file.is_file():
            raise CalibrationError(f"{folder} is not a calibration folder (no {CALIBRATION_FILE}); make one with fastslm-calibrate")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{meta_file} is not valid JSON ({exc}); run fastslm-calibrate again") from None
        if meta.get("format") != CALIBRATION_FORMAT or meta.get("format_version") != CALIBRATION_FORMAT_VERSION:
            raise CalibrationError(f"{meta_file} is not a fastslm calibration record of version {CALIBRATION_FORMAT_VERSION}; "
                                   "run fastslm-calibrate again")  # fmt: skip
        try:
            windows = np.load(windows_file)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read {windows_file} ({exc}); run fastslm-calibrate again") from None
        if windows.ndim != 3 or windows.dtype != np.float32 or len(windows) != meta.get("windows"):
            raise CalibrationError(f"{windows_file} does not match {meta_file}: run fastslm-calibrate again")
        data = cls(windows, meta.get("sources", []), meta.get("skipped", []), meta.get("model", {}))
        if data.sha256 != meta.get("sha256"):
            raise CalibrationError(f"{windows_file} was altered (sha256 differs from {CALIBRATION_FILE}); run fastslm-calibrate again")
        return data


def collect(
    paths: list[Path] | None, n_mels: int, *, max_windows: int = DEFAULT_MAX_WINDOWS, progress: bool | None = None,
    model: dict | None = None,
) -> CalibrationSet:
    """Calibration windows from recordings (None: the default set), windowed as the runtime does.

    At most `max_windows` windows, spread evenly over the recordings and then over their
    windows. Recordings of silence are skipped; if nothing but silence is left, that is an error.
    """
    from tqdm import tqdm

    if max_windows < 1:
        raise CalibrationError(f"--max-windows must be at least 1, got {max_windows}")
    if paths is None:
        paths = default_audio()
        if not paths:
            raise CalibrationError(
                "no calibration audio: the default set (the demo recipe's calib split, models/demo/calibration) is "
                "missing; pass --audio with recordings of speech"
            )
    files = find_audio(list(paths))
    chosen = [files[i] for i in spread(len(files), max_windows)]  # most recordings are shorter than a window
    windows, sources, skipped = [], [], []
    for path in tqdm(chosen, desc="calibration audio", unit="file", file=sys.stderr,
                     disable=None if progress is None else not progress):  # fmt: skip
        samples = load_audio(path)  # AudioError: unreadable, empty or NaN
        peak = float(np.abs(samples).max())
        seconds = round(len(samples) / SAMPLE_RATE, 2)
        if peak < SILENCE_PEAK:
            skipped.append({"path": str(path), "seconds": seconds, "reason": f"silent (peak {peak:.1e})"})
            continue
        w = audio_to_windows(samples, n_mels)
        windows.append(w)
        sources.append({"path": str(path), "seconds": seconds, "windows": int(len(w)), "peak": round(peak, 4)})
    if not windows:
        raise CalibrationError(
            f"all {len(chosen)} calibration recording(s) are silent (peak below -60 dBFS), e.g. {chosen[0]}: "
            "pass recordings of speech"
        )
    stacked = np.concatenate(windows)
    stacked = stacked[spread(len(stacked), max_windows)]
    return CalibrationSet(np.ascontiguousarray(stacked, dtype=np.float32), sources, skipped, model or {})
