"""Audio front end: load any audio as 16 kHz mono, Whisper's log-mel, 30 s windows.

Torch-free (numpy, soundfile, soxr) so the runtime can run without PyTorch; the PyTorch
reference calls these same functions, so there is one mel implementation.

Numerics: `log_mel_spectrogram` reproduces openai-whisper's `log_mel_spectrogram`. The STFT
runs in float64 (whisper uses float32 torch.stft): float64 is the exact value both float32
implementations approximate, and float32 FFT error is relative to a frame's loudest bin, so
quiet mel bins differ most. Measured on jfk.flac, in normalised log-mel units: 1.2e-5 max
abs diff from torch.stft float32 (= whisper; tests assert 3e-5), 6e-8 from torch.stft float64
(assert 1e-6), 1.2e-7 from transformers' numpy WhisperFeatureExtractor (assert 1e-6).
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError, AudioWarning

SAMPLE_RATE = 16000  # Whisper's input rate; every model downstream assumes it
N_FFT = 400  # 25 ms analysis window at 16 kHz -> N_FFT // 2 + 1 = 201 frequency bins
HOP_LENGTH = 160  # 10 ms hop at 16 kHz -> 100 mel frames per second
WINDOW_SECONDS = 30  # Whisper's encoder sees 30 s at a time (n_ctx 1500 after the stride-2 conv)
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000
WINDOW_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
MIN_SAMPLES = SAMPLE_RATE  # the reference zero-pads audio shorter than 1 s to 1 s

# Rates outside this range are not recordings (soxr also spins forever on an infinite rate).
MIN_RATE, MAX_RATE = 1_000, 384_000
# Float audio lies in [-1, 1]; gain can push it a little past, but a peak beyond this is integer
# PCM stored as float (30000 for int16), which the model would hear as saturated noise.
MAX_FLOAT_PEAK = 64.0
# A (a, b) array whose shorter side is longer than this is not channels x samples in any layout.
MAX_CHANNELS = 64
# Integer PCM bit depths accepted from arrays; 64-bit integers are refused (no PCM format uses
# them, so the true scale is unknown). torchaudio.load (the reference's loader) normalises PCM to
# [-1, 1) the same way; unsigned PCM (uint8 WAV) is centred on 2**(bits-1).
_PCM_BITS = (8, 16, 32)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_rate(rate: object, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"{what} sample rate {rate!r} is not a number of Hz: pass the real sample rate")
    if not math.isfinite(rate) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(
            f"{what} sample rate {rate!r} Hz is outside {MIN_RATE}..{MAX_RATE} Hz: pass the rate the audio was recorded at"
        )
    return float(rate)


def _wav_header_seconds(path: Path, real_frames: int, rate: int) -> float | None:
    """Seconds a RIFF/WAVE header promises when its data chunk runs past the end of the file, else None.

    libsndfile silently shortens such a file to the bytes that are there, so a WAV cut in half
    (an interrupted copy or download) would otherwise be transcribed as half the recording.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = path.stat().st_size
            byte_rate = 0
            for _ in range(256):  # chunks before "data" are few (fmt, fact, LIST, ...)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = f.read(min(length, 16))
                    byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else 0
                    f.seek(length - len(fmt) + (length & 1), 1)
                elif name == b"data":
                    available = size - f.tell()
                    # 0 and 0xFFFFFFFF mark a stream written before its length was known.
                    if length in (0, 0xFFFFFFFF) or length <= available or byte_rate <= 0:
                        return None
                    promised = length / byte_rate
                    return promised if promised > real_frames / rate + 0.01 else None
                else:
                    f.seek(length + (length & 1), 1)
    except (OSError, struct.error):
        return None
    return None


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(f"audio file {path} does not exist: check the path")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file: pass the path of one audio file")
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            _check_rate(rate, str(path))
            data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError, MemoryError) as e:
        # TypeError: soundfile asks for a rate and channels for headerless .raw files
        raise AudioError(
            f"cannot read {path} as audio ({_one_line(e)}): pass an uncorrupted audio file "
            "in a format libsndfile reads (wav, flac, ogg, mp3, ...)"
        ) from None
    warn_if_cut_short(path, len(data), rate, stacklevel=4)
    return data, rate


def warn_if_cut_short(path: Path, frames: int, rate: int, stacklevel: int = 3) -> None:
    """AudioWarning when a WAV's header promises more than the `frames` the file holds."""
    promised = _wav_header_seconds(path, frames, rate)
    if promised is not None:
        warnings.warn(
            AudioWarning(
                f"{path} is cut short: its header promises {promised:.1f} s but the file holds "
                f"{frames / rate:.1f} s; using the {frames / rate:.1f} s that are there"
            ),
            stacklevel=stacklevel,
        )


def _array_samples(source: np.ndarray) -> np.ndarray:
    """A user's array -> float64 (samples, channels), whatever its PCM dtype and channel layout."""
    dtype = source.dtype
    if dtype.kind in "iu":
        bits = dtype.itemsize * 8
        if bits not in _PCM_BITS:
            raise AudioError(
                f"audio array has dtype {dtype}: pass float samples in [-1, 1] or 8/16/32-bit integer PCM"
            )
        half = 2.0 ** (bits - 1)
        data = (source.astype(np.float64) - (half if dtype.kind == "u" else 0.0)) / half
    elif dtype.kind == "f":
        data = source.astype(np.float64)
    else:
        raise AudioError(f"audio array has dtype {dtype}: pass float samples in [-1, 1] or 8/16/32-bit integer PCM")
    if data.ndim == 1:
        return data[:, None]
    if data.ndim != 2:
        raise AudioError(f"audio array has shape {source.shape}: pass 1-D samples, (samples, channels) or (channels, samples)")
    rows, cols = data.shape
    if min(rows, cols) > MAX_CHANNELS:
        raise AudioError(
            f"audio array has shape {source.shape}: neither side looks like channels (at most {MAX_CHANNELS}); "
            "pass 1-D samples, (samples, channels) or (channels, samples)"
        )
    # The channel axis is the shorter one: (2, N) is channels-first, (N, 2) channels-last.
    return data.T if rows < cols else data


def load_audio(source: str | Path | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """Audio file path or array -> float32 mono samples at SAMPLE_RATE.

    An array needs `sample_rate`; it is 1-D, (samples, channels) or (channels, samples) (the
    shorter side is the channels), float in [-1, 1] or int8/16/32 or uint8 PCM scaled to [-1, 1].
    Channels are averaged. A WAV shorter than its header says gives an AudioWarning. Raises
    AudioError with a one-line message.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError("an audio array needs its sample rate: call load_audio(array, sample_rate=...)")
        rate = _check_rate(sample_rate, "the audio array's")
        data = _array_samples(source)
    elif isinstance(source, (str, Path)):
        data, rate = _read_file(Path(source))
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"{source} is {rate} Hz but sample_rate={sample_rate} was given: omit sample_rate for files")
    else:
        raise AudioError(f"cannot load audio from a {type(source).__name__}: pass a file path or a numpy array")

    if data.size == 0:
        raise AudioError("the audio has no samples: pass a non-empty recording")
    if not np.isfinite(data).all():
        raise AudioError("the audio contains NaN or infinite samples: fix or re-export the recording")
    peak = float(np.abs(data).max())
    if peak > MAX_FLOAT_PEAK:
        raise AudioError(
            f"the audio's samples reach {peak:.4g}, but float audio lies in [-1, 1]: pass integer PCM as its "
            "integer array (int16, int32, ...) or scale it to [-1, 1]"
        )
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        # soxr HQ: linear-phase, ~-100 dB aliasing; resampling the mono mix equals mixing after.
        mono = soxr.resample(mono, float(rate), SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """(n_mels, 201) Slaney mel filterbank = librosa.filters.mel(sr=16000, n_fft=400, n_mels).

    Rounded to float32 like the table whisper ships (mel_filters.npz); read-only because cached.
    """
    if int(n_mels) != n_mels or n_mels <= 0:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")

    # Slaney's scale: linear (3 per 200 Hz) below 1 kHz, logarithmic above.
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0

    def hz_to_mel(hz: float) -> float:
        return hz / f_sp if hz < min_log_hz else min_log_mel + np.log(hz / min_log_hz) / logstep

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    mel_f = np.where(mels < min_log_mel, mels * f_sp, min_log_hz * np.exp(logstep * (mels - min_log_mel)))
    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # Slaney norm: equal area per filter
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=None)
def _hann() -> np.ndarray:
    # Periodic Hann (torch.hann_window's default), not the symmetric np.hanning.
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


def log_mel_spectrogram(samples: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """float32 (n_mels, len(samples) // 160) log-mel, numerically openai-whisper's."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise AudioError(f"log-mel needs non-empty 1-D samples, got shape {x.shape}: call load_audio first")
    # torch.stft(center=True) reflect-pads n_fft // 2 on both sides; numpy's reflect is the same.
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    # whisper drops the last STFT frame, leaving exactly len // hop frames.
    n_frames = x.size // HOP_LENGTH
    # One 30 s window of frames at a time: the streaming path (mel_stream) computes the very same
    # chunks as samples arrive, so both give bit-identical windows.
    log_spec = np.concatenate(
        [log10_mel(padded, start, min(start + WINDOW_FRAMES, n_frames), n_mels) for start in range(0, n_frames, WINDOW_FRAMES)]
        or [np.zeros((n_mels, 0))],
        axis=1,
    )
    return normalize_log_mel(log_spec, log_spec.max(initial=-np.inf))


def log10_mel(padded: np.ndarray, first: int, last: int, n_mels: int, offset: int = 0) -> np.ndarray:
    """float64 (n_mels, last - first) log10 mel power of STFT frames first..last-1.

    `padded` is the reflect-padded signal, or a piece of it starting at sample `offset` of it.
    """
    start = first * HOP_LENGTH - offset
    frames = np.lib.stride_tricks.sliding_window_view(padded[start : start + (last - first - 1) * HOP_LENGTH + N_FFT], N_FFT)
    spectrum = np.fft.rfft(frames[::HOP_LENGTH] * _hann(), axis=-1)  # (T, 201)
    power = spectrum.real**2 + spectrum.imag**2
    return np.log10(np.maximum(mel_filters(n_mels) @ power.T, 1e-10))  # (n_mels, T)


def normalize_log_mel(log_spec: np.ndarray, peak: float) -> np.ndarray:
    """Whisper's clamp to 8 decades below `peak` (the loudest value of the whole input) and scaling."""
    return ((np.maximum(log_spec, peak - 8.0) + 4.0) / 4.0).astype(np.float32)


def window_count(num_samples: int) -> int:
    """How many 30 s windows `audio_to_windows` makes for this many 16 kHz samples."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    frames = max(int(num_samples), MIN_SAMPLES) // HOP_LENGTH
    return -(-frames // WINDOW_FRAMES)


def audio_to_windows(samples: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """16 kHz samples -> float32 (W, n_mels, 3000) log-mel windows, as the reference FastSLM.

    The mel of the whole audio is cut into non-overlapping windows; the last one is padded
    with 0.0 in normalised mel space (the reference pads the mel, not the audio).
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise AudioError(f"audio must be 1-D mono samples, got shape {x.shape}: call load_audio first")
    if x.size < MIN_SAMPLES:
        x = np.pad(x, (0, MIN_SAMPLES - x.size))
    mel = log_mel_spectrogram(x, n_mels)  # (n_mels, T)
    n_windows = window_count(x.size)
    out = np.zeros((n_mels, n_windows * WINDOW_FRAMES), dtype=np.float32)
    out[:, : mel.shape[1]] = mel
    # (n_mels, W*3000) -> (W, n_mels, 3000)
    return np.ascontiguousarray(out.reshape(n_mels, n_windows, WINDOW_FRAMES).transpose(1, 0, 2))
