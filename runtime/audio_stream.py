"""Read a recording of any length as a stream of 16 kHz mono blocks, holding one block at a time.

`load_audio` returns the whole recording, which is right for a 30 s clip and wrong for an hour
(an hour of 44.1 kHz stereo float32 is 1.3 GB before resampling). `AudioReader` decodes
`block_seconds` of the file, mixes it to mono and resamples it with a streaming soxr resampler
(bit-identical to `soxr.resample` over the whole signal, measured), so memory is one block
whatever the length. An in-memory array is validated by `load_audio` and then handed out in
blocks too, so callers have one interface.

    reader = AudioReader("meeting.flac")
    for block in reader.blocks():      # float32 (<= block_samples,) at SAMPLE_RATE
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .audio import SAMPLE_RATE, _check_rate, _one_line, load_audio, warn_if_cut_short
from .errors import AudioError


@dataclass(frozen=True)
class StreamOptions:
    block_seconds: float = 10.0  # audio decoded per step; the reader's memory is about this much

    def __post_init__(self):
        if not (isinstance(self.block_seconds, (int, float)) and 0.1 <= self.block_seconds <= 600):
            raise AudioError(f"block_seconds {self.block_seconds!r} is invalid: use 0.1 to 600 seconds")

    @property
    def block_samples(self) -> int:
        return int(round(self.block_seconds * SAMPLE_RATE))


class AudioReader:
    """One recording (file path or array) read block by block as float32 mono at SAMPLE_RATE.

    `seconds` is the duration from the file header (before reading any samples) or the array.
    Errors, including a file that turns out truncated half way, are AudioError with one line.
    """

    def __init__(self, source: "str | Path | np.ndarray", sample_rate: int | None = None,
                 options: StreamOptions | None = None):
        self.options = options or StreamOptions()
        self.source = source
        self._array: np.ndarray | None = None
        if isinstance(source, np.ndarray):
            self._array = load_audio(source, sample_rate)  # validates dtype, shape, rate, NaNs; resamples
            self.rate = SAMPLE_RATE
            self.seconds = len(self._array) / SAMPLE_RATE
            return
        if not isinstance(source, (str, Path)):
            raise AudioError(f"cannot load audio from a {type(source).__name__}: pass a file path or a numpy array")
        self.path = Path(source)
        if not self.path.exists():
            raise AudioError(f"audio file {self.path} does not exist: check the path")
        if self.path.is_dir():
            raise AudioError(f"{self.path} is a directory, not an audio file: pass the path of one audio file")
        try:
            info = sf.info(str(self.path))
        except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
            raise AudioError(
                f"cannot read {self.path} as audio ({_one_line(e)}): pass an uncorrupted audio file "
                "in a format libsndfile reads (wav, flac, ogg, mp3, ...)"
            ) from None
        if sample_rate is not None and sample_rate != info.samplerate:
            raise AudioError(f"{source} is {info.samplerate} Hz but sample_rate={sample_rate} was given: omit sample_rate for files")
        _check_rate(info.samplerate, str(self.path))
        warn_if_cut_short(self.path, info.frames, info.samplerate)
        self.rate = info.samplerate
        self.seconds = info.frames / info.samplerate if info.frames > 0 else 0.0

    def blocks(self) -> Iterator[np.ndarray]:
        """float32 mono blocks at SAMPLE_RATE, each at most options.block_samples long (the last may be shorter)."""
        if self._array is not None:
            step = self.options.block_samples
            for start in range(0, len(self._array), step):
                yield self._array[start : start + step]
            return
        yield from self._file_blocks()

    def _file_blocks(self) -> Iterator[np.ndarray]:
        in_block = max(1, int(round(self.options.block_seconds * self.rate)))
        resampler = None
        if self.rate != SAMPLE_RATE:
            # soxr HQ, as load_audio: linear phase, ~-100 dB aliasing; resampling the mono mix equals mixing after.
            resampler = soxr.ResampleStream(float(self.rate), SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        total = 0
        try:
            with sf.SoundFile(str(self.path)) as f:
                while True:
                    data = f.read(in_block, dtype="float32", always_2d=True)
                    last = len(data) < in_block
                    total += len(data)
                    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
                    if not np.isfinite(mono).all():
                        raise AudioError(f"{self.path} contains NaN or infinite samples: fix or re-export the recording")
                    if resampler is not None:
                        mono = resampler.resample_chunk(mono, last=last)
                    if len(mono):
                        yield np.ascontiguousarray(mono, dtype=np.float32)
                    if last:
                        break
        except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
            raise AudioError(
                f"cannot read {self.path} past {total / self.rate:.1f} s ({_one_line(e)}): the file is damaged or "
                "truncated; re-export it"
            ) from None
        if total == 0:
            raise AudioError("the audio has no samples: pass a non-empty recording")
