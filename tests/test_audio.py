"""fastslm.runtime.audio: loading, Slaney mel filters, Whisper log-mel, 30 s windows.

The log-mel is checked against independent computations (torch.stft + transformers' mel
filters + the Whisper normalisation written out here, and transformers' numpy
WhisperFeatureExtractor). Tolerances are max abs diff in normalised log-mel units; measured
on jfk.flac: 1.2e-5 vs float32 torch.stft (what openai-whisper runs; our STFT is float64 and
float32 FFT rounding dominates), 6e-8 vs float64 torch.stft, 1.2e-7 vs the feature extractor.
"""

from __future__ import annotations


import threading
import warnings

import numpy as np
import pytest
import soundfile as sf

from fastslm.runtime import audio
from fastslm.runtime.errors import AudioError, AudioWarning, reported_in_one_line

TOL_TORCH_F32 = 3e-5  # measured 1.2e-5: float32 FFT rounding in quiet bins
TOL_TORCH_F64 = 1e-6  # measured 6e-8: same maths, both float64
TOL_FEATURE_EXTRACTOR = 1e-6  # measured 1.2e-7


def _hf_mel_filters(n_mels: int) -> np.ndarray:
    audio_utils = pytest.importorskip("transformers.audio_utils")
    return audio_utils.mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0,
        max_frequency=8000,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    ).T


def _torch_whisper_log_mel(samples: np.ndarray, n_mels: int, dtype_name: str) -> np.ndarray:
    """openai-whisper's recipe, written out with torch.stft and transformers' filters."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    x = torch.tensor(samples, dtype=dtype)
    stft = torch.stft(
        x, 400, 160, window=torch.hann_window(400, dtype=dtype), center=True, pad_mode="reflect", return_complex=True
    )
    power = stft[..., :-1].abs() ** 2
    mel = torch.tensor(_hf_mel_filters(n_mels), dtype=dtype) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


@pytest.fixture(scope="module")
def jfk(jfk_path) -> np.ndarray:
    return audio.load_audio(jfk_path)


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * audio.SAMPLE_RATE))
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------- constants, mel filters


def test_constants_are_consistent():
    assert audio.WINDOW_SAMPLES == audio.WINDOW_SECONDS * audio.SAMPLE_RATE == 480000
    assert audio.WINDOW_FRAMES == audio.WINDOW_SAMPLES // audio.HOP_LENGTH == 3000
    assert audio.MIN_SAMPLES == audio.SAMPLE_RATE


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ours = audio.mel_filters(n_mels)
    assert ours.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, _hf_mel_filters(n_mels), rtol=0, atol=1e-6)
    assert audio.mel_filters(n_mels) is ours  # cached
    assert not ours.flags.writeable


# ---------------------------------------------------------------- log-mel


@pytest.mark.parametrize("dtype_name, tol", [("float32", TOL_TORCH_F32), ("float64", TOL_TORCH_F64)])
def test_log_mel_matches_torch_stft(jfk, dtype_name, tol):
    ours = audio.log_mel_spectrogram(jfk, n_mels=128)
    ref = _torch_whisper_log_mel(jfk, 128, dtype_name)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (128, len(jfk) // audio.HOP_LENGTH)
    diff = float(np.abs(ours - ref).max())
    assert diff < tol, f"max abs diff {diff:.3g} vs torch.stft {dtype_name}"


def test_log_mel_matches_whisper_feature_extractor(jfk):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    # The extractor always pads to 30 s; feed both the same padded audio. Its public __call__
    # picks a torch float32 path when torch is installed, so call the numpy one directly.
    padded = np.pad(jfk, (0, audio.WINDOW_SAMPLES - len(jfk)))
    ref = fe._np_extract_fbank_features(padded[None], "cpu")[0]
    ours = audio.log_mel_spectrogram(padded, n_mels=128)
    assert ours.shape == ref.shape == (128, audio.WINDOW_FRAMES)
    diff = float(np.abs(ours - ref).max())
    assert diff < TOL_FEATURE_EXTRACTOR, f"max abs diff {diff:.3g} vs WhisperFeatureExtractor"


def test_log_mel_frame_count_and_80_bins():
    x = _noise(1.234)
    x[8000:] = 0.0  # digital silence would reach log10(1e-10) without the clamp
    mel = audio.log_mel_spectrogram(x, n_mels=80)
    assert mel.shape == (80, len(x) // audio.HOP_LENGTH)
    # the (max - 8) clamp bounds the dynamic range to 8 decades = 2.0 normalised units
    assert mel.max() - mel.min() == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------- load_audio


def test_load_stereo_44k_flac(jfk_path, jfk):
    info = sf.info(str(jfk_path))
    assert (info.samplerate, info.channels) == (44100, 2)
    expected = info.frames * audio.SAMPLE_RATE / info.samplerate
    assert jfk.dtype == np.float32 and jfk.ndim == 1
    assert abs(len(jfk) - expected) <= 1
    assert np.isfinite(jfk).all() and 0.05 < np.abs(jfk).max() <= 1.0
    # the mono mix is the channel average
    data, _ = sf.read(str(jfk_path), dtype="float32")
    mix = audio.load_audio(data.mean(axis=1), sample_rate=44100)
    np.testing.assert_allclose(audio.load_audio(str(jfk_path)), mix, atol=1e-6)


def test_load_int16_array_8k():
    t = np.arange(8000) / 8000
    pcm = (16384 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    x = audio.load_audio(pcm, sample_rate=8000)
    assert x.dtype == np.float32 and abs(len(x) - 16000) <= 1
    assert abs(np.abs(x[1000:-1000]).max() - 0.5) < 0.01  # int16 full scale -> 1.0


@pytest.mark.parametrize("axis", [1, 0], ids=["samples-channels", "channels-samples"])
def test_load_2d_array_averages_channels(axis):
    left = _noise(0.5, seed=1)
    right = _noise(0.5, seed=2)
    x = audio.load_audio(np.stack([left, right], axis=axis), sample_rate=16000)
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "float16"])
def test_integer_pcm_arrays_are_scaled_to_unit_range(dtype):
    """Half-scale 440 Hz in each PCM dtype reads as a 0.5-peak float sine (uint8 is centred on 128)."""
    t = np.arange(16000) / 16000
    sine = 0.5 * np.sin(2 * np.pi * 440 * t)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        pcm = sine.astype(dtype)
    else:
        half = 2.0 ** (np.dtype(dtype).itemsize * 8 - 1)
        pcm = np.round(sine * half + (half if info.min == 0 else 0)).astype(dtype)
    x = audio.load_audio(pcm, sample_rate=16000)
    np.testing.assert_allclose(x, sine, atol=2 / 2**7 if np.dtype(dtype).itemsize == 1 else 1e-3)


def test_unsigned_pcm_silence_is_zero():
    assert not audio.load_audio(np.full(1600, 128, dtype=np.uint8), sample_rate=16000).any()


@pytest.mark.parametrize(
    "rate", [float("inf"), float("-inf"), float("nan"), 999, 384_001, 1e12, "16000", True],
    ids=["inf", "-inf", "nan", "999", "384001", "1e12", "str", "bool"],
)
def test_absurd_rates_are_refused_without_hanging(rate):
    """soxr spins forever on an infinite rate: the loader must refuse it, and quickly."""
    outcome = []

    def load():
        try:
            audio.load_audio(np.zeros(16000, dtype=np.float32), sample_rate=rate)
            outcome.append("accepted")
        except AudioError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert outcome, f"load_audio(sample_rate={rate!r}) did not return within 20 s"
    assert isinstance(outcome[0], AudioError), f"rate {rate!r} was {outcome[0]}"
    assert "\n" not in str(outcome[0])


@pytest.mark.parametrize("rate", [1000, 8000, 384_000])
def test_edge_rates_are_accepted(rate):
    x = audio.load_audio(np.zeros(rate // 2, dtype=np.float32), sample_rate=rate)
    assert abs(len(x) - 8000) <= 1


def _write_truncated_wav(tmp_path, seconds=11.0, keep=0.5):
    path = tmp_path / "cut.wav"
    sf.write(str(path), _noise(seconds), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_truncated_wav_warns_naming_file_and_both_durations(tmp_path):
    path = _write_truncated_wav(tmp_path)
    with pytest.warns(AudioWarning) as caught:
        x = audio.load_audio(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "11.0 s" in message and "5.5 s" in message and "\n" not in message
    assert abs(len(x) / audio.SAMPLE_RATE - 5.5) < 0.01


def test_complete_wav_does_not_warn(tmp_path):
    path = tmp_path / "whole.wav"
    sf.write(str(path), _noise(3.0), 16000, subtype="PCM_16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio.load_audio(path)


def test_truncated_wav_warning_is_one_cli_line(tmp_path, capsys):
    path = _write_truncated_wav(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with reported_in_one_line("fastslm-run"):
            audio.load_audio(path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastslm-run: warning: {path} is cut short")


def test_resampling_keeps_frequency():
    sr = 44100
    t = np.arange(2 * sr) / sr
    x = audio.load_audio(np.sin(2 * np.pi * 1000 * t), sample_rate=sr)
    spectrum = np.abs(np.fft.rfft(x))
    peak_hz = np.argmax(spectrum) * audio.SAMPLE_RATE / len(x)
    assert abs(peak_hz - 1000) <= audio.SAMPLE_RATE / len(x)


def _missing(tmp_path):
    return tmp_path / "nope.wav"


def _directory(tmp_path):
    return tmp_path


def _text_as_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    return path


def _truncated_flac(tmp_path, jfk_path):
    data = jfk_path.read_bytes()
    path = tmp_path / "half.flac"
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000)
    return path


@pytest.mark.parametrize(
    "make",
    [_missing, _directory, _text_as_wav, _truncated_flac, _empty_wav],
    ids=["missing", "directory", "text-as-wav", "truncated-flac", "zero-length-wav"],
)
def test_bad_files_raise_one_line_audio_error(tmp_path, jfk_path, make):
    path = make(tmp_path, jfk_path) if make is _truncated_flac else make(tmp_path)
    with pytest.raises(AudioError) as err:
        audio.load_audio(path)
    message = str(err.value)
    assert message and "\n" not in message
    assert err.value.__cause__ is None  # no soundfile traceback chained in


@pytest.mark.parametrize(
    "array, rate",
    [
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000),
        (np.array([0.0, np.inf, 0.1]), 16000),
        (np.zeros(100, dtype=np.float32), None),
        (np.zeros(0, dtype=np.float32), 16000),
        (np.zeros(100, dtype=np.float32), 0),
        (np.zeros(100, dtype=np.float32), -8000),
        (np.zeros((2, 3, 4), dtype=np.float32), 16000),
        (np.zeros((100, 200), dtype=np.float32), 16000),
        (np.zeros((4, 0), dtype=np.float32), 16000),
        (np.zeros(100, dtype=np.int64), 16000),
        (np.zeros(100, dtype=bool), 16000),
        (np.zeros(100, dtype=np.complex64), 16000),
        (np.array(["a", "b"]), 16000),
    ],
    ids=["nan", "inf", "no-rate", "empty", "rate-0", "rate-negative", "3d", "no-channel-axis", "zero-channels",
         "int64", "bool", "complex", "str"],
)
def test_bad_arrays_raise_one_line_audio_error(array, rate):
    with pytest.raises(AudioError) as err:
        audio.load_audio(array, sample_rate=rate)
    assert str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "seconds, windows",
    [(0.3, 1), (1.0, 1), (30.0, 1), (30.01, 2), (60.0, 2), (95.0, 4)],
)
def test_window_count_and_shape(seconds, windows):
    x = _noise(seconds)
    assert audio.window_count(len(x)) == windows
    mel = audio.audio_to_windows(x)
    assert mel.shape == (windows, 128, audio.WINDOW_FRAMES) and mel.dtype == np.float32


def test_short_audio_padded_to_one_second():
    x = _noise(0.3)
    windows = audio.audio_to_windows(x, n_mels=80)
    assert windows.shape == (1, 80, 3000)
    padded = np.pad(x, (0, audio.MIN_SAMPLES - len(x)))
    np.testing.assert_array_equal(windows[0, :, :100], audio.log_mel_spectrogram(padded, n_mels=80))
    assert not windows[0, :, 100:].any()  # mel-space padding is 0.0


def test_windows_concatenate_to_whole_log_mel():
    x = _noise(95.0)
    x[40 * audio.SAMPLE_RATE :] *= 1e-3  # quieter later audio: the (max - 8) clamp must be global
    windows = audio.audio_to_windows(x)
    frames = len(x) // audio.HOP_LENGTH  # 9500
    joined = np.concatenate(list(windows), axis=1)
    np.testing.assert_array_equal(joined[:, :frames], audio.log_mel_spectrogram(x))
    assert not joined[:, frames:].any()  # last window zero-padded in mel space
    assert not windows[-1, :, frames - 3 * audio.WINDOW_FRAMES :].any()


@pytest.mark.parametrize("value", [30000.0, 3.4e38, 1e307], ids=["int16-as-float", "float32-max", "near-float64-max"])
def test_float_audio_far_outside_unit_range_is_refused(value):
    """Integer PCM cast to float would be heard as saturated noise; float64 extremes used to overflow
    the channel mean (a numpy warning) or come back as inf after the float32 cast."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AudioError, match="float audio lies in \\[-1, 1\\]"):
            audio.load_audio(np.full((100, 2), value), sample_rate=16000)


def test_float_audio_slightly_past_full_scale_is_kept():
    x = audio.load_audio(np.full(1600, 1.5, dtype=np.float32), sample_rate=16000)
    assert np.allclose(x, 1.5)


def test_headerless_raw_file_is_one_line(tmp_path):
    path = tmp_path / "take.raw"
    path.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(AudioError, match="cannot read"):
        audio.load_audio(path)
