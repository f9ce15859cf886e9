"""Transcript formats: plain text, JSON record, SubRip (.srt) and WebVTT (.vtt), and `--output-dir` files.

Each format is written segment by segment (`cue`), so the CLI can stream subtitles as the
segments are decoded; `render` gives a whole file. Files under --output-dir are written to a
temporary name beside the target and renamed into place, and existing files are never replaced
unless the caller says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import OptionError
from .output_folder import written_whole
from .transcribe import Segment, Transcript

FORMATS = ("txt", "json", "srt", "vtt")


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS,mmm (SubRip, decimal ',') or HH:MM:SS.mmm (WebVTT, decimal '.')."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, and "-->" would read as a timing line in WebVTT.
    lines = [line.strip() for line in text.replace("-->", "->").splitlines() if line.strip()]
    return "\n".join(lines) or "..."


def header(fmt: str) -> str:
    return "WEBVTT\n\n" if fmt == "vtt" else ""


def cue(fmt: str, index: int, segment: Segment) -> str:
    """One segment in `fmt` (txt, srt or vtt); `index` counts from 1 (SubRip numbers its cues)."""
    if fmt == "txt":
        return segment.text.strip() + "\n" if segment.text.strip() else ""
    if fmt == "srt":
        times = f"{timestamp(segment.start, ',')} --> {timestamp(segment.end, ',')}"
        return f"{index}\n{times}\n{_cue_text(segment.text)}\n\n"
    if fmt == "vtt":
        times = f"{timestamp(segment.start, '.')} --> {timestamp(segment.end, '.')}"
        return f"{times}\n{_cue_text(segment.text)}\n\n"
    raise OptionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def record(transcript: Transcript, **fields) -> dict:
    """The JSON record: `fields` (audio, model, ...) then text, segments and the skipped spans."""
    return {
        **fields,
        "text": transcript.text,
        "audio_seconds": round(transcript.seconds, 3),
        "segments": [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text} for s in transcript.segments],
        "skipped": [{"start": round(a, 3), "end": round(b, 3)} for a, b in transcript.skipped],
    }


def render(fmt: str, transcript: Transcript, **fields) -> str:
    if fmt == "json":
        return json.dumps(record(transcript, **fields), ensure_ascii=False) + "\n"
    pieces = [cue(fmt, i, s) for i, s in enumerate((s for s in transcript.segments if s.text.strip()), 1)]
    return header(fmt) + "".join(pieces)


def output_paths(out_dir: Path, audio: Path, formats: Iterable[str] = FORMATS) -> dict[str, Path]:
    return {fmt: out_dir / f"{audio.stem}.{fmt}" for fmt in formats}


def check_outputs(out_dir: Path, audio_files: list[Path], overwrite: bool) -> None:
    """Refuse before any work when outputs would collide or replace files the user has."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"--output-dir {out_dir} is a file; pass a folder")
    stems: dict[str, Path] = {}
    for audio in audio_files:
        if audio.stem in stems and stems[audio.stem] != audio:
            raise OptionError(f"{stems[audio.stem]} and {audio} would both write {audio.stem}.* to {out_dir}; "
                              "rename one or run them with different --output-dir")  # fmt: skip
        stems[audio.stem] = audio
        if not overwrite:
            existing = [p for p in output_paths(out_dir, audio).values() if p.exists()]
            if existing:
                raise OptionError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --output-dir")


def write_outputs(out_dir: Path, audio_path: Path, transcript: Transcript, **fields) -> dict[str, Path]:
    """NAME.txt / .json / .srt / .vtt side by side, as Whisper's tools write them; each file appears whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, audio_path)
    for fmt, path in paths.items():
        with written_whole(path) as f:
            f.write(render(fmt, transcript, **fields))
    return paths
