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
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

SAMPLE_RATE = 16000  # Whisper's input rate; every model downstream assumes it
N_FFT = 400  # 25 ms analysis window at 16 kHz -> N_FFT // 2 + 1 = 201 frequency bins
HOP_LENGTH = 160  # 10 ms hop at 16 kHz -> 100 mel frames per second
WINDOW_SECONDS = 30  # Whisper's encoder sees 30 s at a time (n_ctx 1500 after the stride-2 conv)
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000
WINDOW_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
MIN_SAMPLES = SAMPLE_RATE  # the reference zero-pads audio shorter than 1 s to 1 s

# torchaudio.load (the reference's loader) normalises PCM to [-1, 1); integer arrays get the same.
_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioError(f"audio file {path} does not exist: check the path")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file: pass the path of one audio file")
    try:
        with sf.SoundFile(str(path)) as f:
            data = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(
            f"cannot read {path} as audio ({_one_line(e)}): pass an uncorrupted audio file "
            "in a format libsndfile reads (wav, flac, ogg, mp3, ...)"
        ) from None
    return data, rate


def load_audio(source: str | Path | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """Audio file path or array -> float32 mono samples at SAMPLE_RATE.

    An array is 1-D or (samples, channels) and needs `sample_rate`; int16/int32 PCM is scaled
    to [-1, 1]. Channels are averaged. Raises AudioError with a one-line message.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError("an audio array needs its sample rate: call load_audio(array, sample_rate=...)")
        if source.ndim not in (1, 2):
            raise AudioError(f"audio array has shape {source.shape}: pass 1-D samples or (samples, channels)")
        if source.dtype in _INT_SCALE:
            data = source.astype(np.float64) / _INT_SCALE[source.dtype]
        elif np.issubdtype(source.dtype, np.floating) or np.issubdtype(source.dtype, np.integer):
            data = source.astype(np.float64)
        else:
            raise AudioError(f"audio array has dtype {source.dtype}: pass float or int16/int32 PCM samples")
        rate = sample_rate
    elif isinstance(source, (str, Path)):
        data, rate = _read_file(Path(source))
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"{source} is {rate} Hz but sample_rate={sample_rate} was given: omit sample_rate for files")
    else:
        raise AudioError(f"cannot load audio from a {type(source).__name__}: pass a file path or a numpy array")

    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0:
        raise AudioError(f"sample rate {rate!r} is not a positive number of Hz: pass the real sample rate")
    mono = data.mean(axis=1) if data.ndim == 2 else data
    if mono.size == 0:
        raise AudioError("the audio has no samples: pass a non-empty recording")
    if not np.isfinite(mono).all():
        raise AudioError("the audio contains NaN or infinite samples: fix or re-export the recording")
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
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:-1]
    spectrum = np.fft.rfft(frames * _hann(), axis=-1)  # (T, 201)
    power = spectrum.real**2 + spectrum.imag**2
    mel = mel_filters(n_mels) @ power.T  # (n_mels, T)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    # The clamp is global over the input: this is why windows are cut after the log-mel.
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


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
