"""Seeded audio augmentation for the demo corpus (numpy + soxr only), 16 kHz mono float32.

:func:`sample_augment` draws a JSON-serializable params dict (recorded in the manifest) and
:func:`apply_augment` applies it deterministically (the noise / reverb draws come from
``params["seed"]``), in this order:

1. ``speed``: resample-based tempo+pitch change, factor 0.9-1.1 (length / factor);
2. ``pad``: silence (seconds) before / after, 0-0.6 s each;
3. ``reverb``: exponentially decaying noise impulse response, RT60 0.15-0.7 s, wet 0.2-0.6;
4. ``telephone``: 300-3400 Hz band-pass (occasionally);
5. ``noise``: white / pink / brown noise at ``snr_db`` 15-40 dB, SNR measured against the
   mean power of the whole clip at that point;
6. ``gain_db`` -12..+4 dB, then the peak is limited to 0.99 (scaled, never clipped).

Every step except ``speed`` and ``pad`` keeps the length.

``sample_augment(rng, wide=True)`` (the corpus's ``--mix wide``) draws more often and wider, and
adds two steps: ``pitch`` (sox's ``pitch`` effect, -350..+350 cents, the length kept: another
speaker's pitch at the same rate) after ``speed``, and ``lowpass`` (3.5-7 kHz, a muffled or old
recording) beside ``telephone``. Noise goes down to 8 dB SNR.
"""

from __future__ import annotations

import random
import subprocess

import numpy as np
import soxr

SAMPLE_RATE = 16000


def change_speed(x: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Play ``factor`` times faster (pitch moves too): length becomes ``len(x) / factor``."""
    if factor == 1.0:
        return x.astype(np.float32, copy=True)
    # read x as if it had been recorded at sr * factor and resample it to sr
    return soxr.resample(x.astype(np.float32), sr * factor, sr).astype(np.float32)


def apply_gain(x: np.ndarray, gain_db: float) -> np.ndarray:
    return (x * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)


def pad_silence(x: np.ndarray, before_s: float, after_s: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    return np.concatenate(
        [np.zeros(int(round(before_s * sr)), np.float32), x.astype(np.float32), np.zeros(int(round(after_s * sr)), np.float32)]
    )


def colored_noise(n: int, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """Unit-power noise: white (flat), pink (1/f power) or brown (1/f^2 power)."""
    white = rng.standard_normal(n)
    if color != "white" and n > 1:
        spec = np.fft.rfft(white)
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        exponent = {"pink": 0.5, "brown": 1.0}[color]
        spec /= f**exponent
        spec[0] = 0.0
        white = np.fft.irfft(spec, n)
    power = float(np.mean(white**2))
    return (white / np.sqrt(power if power > 0 else 1.0)).astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator, color: str = "white") -> np.ndarray:
    """``x`` + noise whose power is ``mean(x**2) / 10**(snr_db / 10)``."""
    p_signal = float(np.mean(x.astype(np.float64) ** 2))
    noise = colored_noise(len(x), rng, color) * np.float32(np.sqrt(p_signal / 10.0 ** (snr_db / 10.0)))
    return (x + noise).astype(np.float32)


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def add_reverb(x: np.ndarray, rng: np.random.Generator, rt60: float = 0.4, wet: float = 0.4, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Dry + wet mix with an exponentially decaying noise impulse response; same length and RMS."""
    n_ir = max(1, int(rt60 * sr))
    t = np.arange(n_ir) / sr
    ir = rng.standard_normal(n_ir) * np.exp(-6.9078 * t / rt60)  # -60 dB at rt60
    ir[: int(0.002 * sr)] = 0.0  # a short pre-delay before the reflections
    ir /= np.sqrt(np.sum(ir**2)) + 1e-12
    wet_sig = _fft_convolve(x.astype(np.float64), ir)[: len(x)]
    y = (1.0 - wet) * x + wet * wet_sig
    rms_x, rms_y = np.sqrt(np.mean(x.astype(np.float64) ** 2)), np.sqrt(np.mean(y**2))
    if rms_y > 0:
        y *= rms_x / rms_y
    return y.astype(np.float32)


def telephone(x: np.ndarray, sr: int = SAMPLE_RATE, low: float = 300.0, high: float = 3400.0) -> np.ndarray:
    """Band-pass ``low``-``high`` Hz (FFT mask with 100 Hz raised-cosine edges; ``low`` 0: low-pass); same length."""
    n = len(x)
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    edge = 100.0
    mask = np.ones_like(f)
    mask[f < low - edge / 2] = 0.0
    mask[f > high + edge / 2] = 0.0
    rise = (f >= low - edge / 2) & (f < low + edge / 2) & (low > 0)  # low 0: a low-pass, DC kept
    mask[rise] = 0.5 - 0.5 * np.cos(np.pi * (f[rise] - (low - edge / 2)) / edge)
    fall = (f > high - edge / 2) & (f <= high + edge / 2)
    mask[fall] = 0.5 + 0.5 * np.cos(np.pi * (f[fall] - (high - edge / 2)) / edge)
    return np.fft.irfft(spec * mask, n).astype(np.float32)


def shift_pitch(x: np.ndarray, cents: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Pitch moved by ``cents`` at the same length (sox's ``pitch`` effect: WSOLA + resampling)."""
    raw = ["-t", "raw", "-r", str(sr), "-e", "floating-point", "-b", "32", "-c", "1"]
    try:
        done = subprocess.run(["sox", *raw, "-", *raw, "-", "pitch", f"{cents:.0f}"],
                              input=x.astype("<f4").tobytes(), capture_output=True, check=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError("the wide augmentation needs sox: apt-get install -y sox") from None
    y = np.frombuffer(done.stdout, dtype="<f4").astype(np.float32)
    return y[: len(x)] if len(y) >= len(x) else np.pad(y, (0, len(x) - len(y)))


def sample_augment(rng: random.Random, wide: bool = False) -> dict:
    """Draw augmentation params; each step is present with its own probability (see the module doc)."""
    if wide:
        return _sample_wide(rng)
    p: dict = {"seed": rng.randrange(2**31)}
    if rng.random() < 0.5:
        p["speed"] = round(rng.uniform(0.9, 1.1), 3)
    if rng.random() < 0.4:
        p["pad"] = [round(rng.uniform(0.0, 0.6), 2), round(rng.uniform(0.0, 0.6), 2)]
    if rng.random() < 0.35:
        p["reverb"] = {"rt60": round(rng.uniform(0.15, 0.7), 2), "wet": round(rng.uniform(0.2, 0.6), 2)}
    if rng.random() < 0.12:
        p["telephone"] = True
    if rng.random() < 0.6:
        p["noise"] = {"snr_db": round(rng.uniform(15.0, 40.0), 1), "color": rng.choice(["white", "pink", "pink", "brown"])}
    p["gain_db"] = round(rng.uniform(-12.0, 4.0), 1)
    return p


def _sample_wide(rng: random.Random) -> dict:
    p: dict = {"seed": rng.randrange(2**31)}
    if rng.random() < 0.5:
        p["speed"] = round(rng.uniform(0.85, 1.15), 3)
    if rng.random() < 0.4:
        p["pitch"] = round(rng.uniform(-350.0, 350.0))
    if rng.random() < 0.4:
        p["pad"] = [round(rng.uniform(0.0, 0.6), 2), round(rng.uniform(0.0, 0.6), 2)]
    if rng.random() < 0.4:
        p["reverb"] = {"rt60": round(rng.uniform(0.15, 0.8), 2), "wet": round(rng.uniform(0.2, 0.6), 2)}
    band = rng.random()
    if band < 0.12:
        p["telephone"] = True
    elif band < 0.24:
        p["lowpass"] = round(rng.uniform(3500.0, 7000.0))
    if rng.random() < 0.65:
        p["noise"] = {"snr_db": round(rng.uniform(8.0, 40.0), 1), "color": rng.choice(["white", "pink", "pink", "brown"])}
    p["gain_db"] = round(rng.uniform(-14.0, 4.0), 1)
    return p


def apply_augment(x: np.ndarray, params: dict, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Apply ``params`` (from :func:`sample_augment`) to ``x``; deterministic."""
    rng = np.random.default_rng(params.get("seed", 0))
    y = x.astype(np.float32)
    if "speed" in params:
        y = change_speed(y, params["speed"], sr)
    if "pitch" in params:
        y = shift_pitch(y, params["pitch"], sr)
    if "pad" in params:
        y = pad_silence(y, params["pad"][0], params["pad"][1], sr)
    if "reverb" in params:
        y = add_reverb(y, rng, params["reverb"]["rt60"], params["reverb"]["wet"], sr)
    if params.get("telephone"):
        y = telephone(y, sr)
    if "lowpass" in params:
        y = telephone(y, sr, low=0.0, high=params["lowpass"])
    if "noise" in params:
        y = add_noise(y, params["noise"]["snr_db"], rng, params["noise"].get("color", "white"))
    y = apply_gain(y, params.get("gain_db", 0.0))
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 0.99:
        y = y * np.float32(0.99 / peak)
    return y.astype(np.float32)
