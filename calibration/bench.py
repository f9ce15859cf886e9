"""ONNX Runtime speed of quantized bundles against their FP32 bundle, on this machine's CPU.

    python -m fastslm.calibration.bench FP32_BUNDLE INT8_BUNDLE [INT4_BUNDLE ...] [--threads 2]

Per bundle, opened through the runtime's own OnnxBackend (what `fastslm-run` gets):

    audio tower   ms per 30 s window: one window a call, the median of --repeat passes over --windows windows
    decode        tokens/s: after an ASR prefill over --context-windows windows of speech tokens (default
                  one), --tokens single-token steps (the backend's own greedy choices; end tokens do not
                  stop it); the median of --repeat

Bundles are measured in turns (A, B, A, B, ...) so background load hits all of them alike; the
ratios against the first bundle are what to compare across machines, not the absolute numbers.
--disable-cse opens every audio-tower session without ONNX Runtime's common-subexpression
elimination (which merges the per-consumer Q/DQ pairs and so keeps q/k/v projections from the
int8 kernels; see docs/QUANTIZATION.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ..runtime.errors import OptionError, reported_in_one_line


def _windows(audio: Path, n_mels: int, count: int) -> np.ndarray:
    from ..runtime.audio import audio_to_windows, load_audio

    windows = audio_to_windows(load_audio(audio), n_mels)
    return np.ascontiguousarray(np.resize(windows, (count, *windows.shape[1:])))


def _open(bundle: Path, threads: int | None, disable_cse: bool):
    from ..runtime.generate import Pipeline
    from ..runtime.onnx_backend import OnnxBackend, session_options
    from ..runtime.tokenizer import Tokenizer

    backend = OnnxBackend.from_bundle(bundle, threads=threads, max_windows_per_batch=1, verify=False)
    if disable_cse:
        import onnxruntime as ort

        options = session_options(backend.bundle.precision, backend.providers, threads,
                                  exact_int8=not backend.bundle.int8_weights_lack_zero_points)
        backend._audio = ort.InferenceSession(str(backend.bundle.graph_path("audio_tower")), options,
                                              providers=backend.providers,
                                              disabled_optimizers=["CommonSubexpressionElimination"])  # fmt: skip
    return Pipeline(backend, Tokenizer.from_file(backend.bundle.tokenizer_path), model_name=backend.bundle.model_name)


def audio_ms(pipe, windows: np.ndarray) -> float:
    start = time.perf_counter()
    for w in windows:
        pipe.backend.encode_windows(w[None])
    return (time.perf_counter() - start) / len(windows) * 1000


def decode_rate(pipe, window: np.ndarray, tokens: int, context_windows: int = 1) -> float:
    from ..runtime.generate import SpeechTokens

    b = pipe.backend
    speech = np.tile(b.encode_windows(window[None]), (context_windows, 1, 1))  # the cache a long recording leaves
    embeddings = speech.reshape(-1, speech.shape[-1])
    prefill = pipe.prefill(SpeechTokens(embeddings, context_windows, 30.0 * context_windows), "transcribe")
    logits, cache = prefill.logits, prefill.cache
    start = time.perf_counter()
    for _ in range(tokens):
        token = np.array([int(np.argmax(logits))], np.int64)
        logits, cache = b.decode(b.embed_tokens(token), cache)
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastslm.calibration.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="the FP32 bundle first, then the bundles to compare with it")
    p.add_argument("--audio", type=Path, help="recording to take windows from (default: jfk.flac)")
    p.add_argument("--windows", type=int, default=3, help="windows per audio-tower pass")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per pass")
    p.add_argument("--repeat", type=int, default=5, help="passes per bundle (the median is reported)")
    p.add_argument("--context-windows", type=int, default=1, help="windows of speech tokens before the decode steps")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--disable-cse", action="store_true", help="audio-tower sessions without common-subexpression elimination")
    a = p.parse_args(argv)
    with reported_in_one_line("bench"):
        from .evaluation import jfk_utterance

        jfk = jfk_utterance()
        if a.audio is None and jfk is None:
            raise OptionError("no --audio and no jfk.flac: pass --audio or set FASTSLM_SHARED_DATA to the folder holding it")
        audio = a.audio or jfk.path
        pipes = [_open(b, a.threads, a.disable_cse) for b in a.bundles]
        windows = _windows(audio, pipes[0].backend.n_mels, a.windows)
        ms = {i: [] for i in range(len(pipes))}
        rate = {i: [] for i in range(len(pipes))}
        for i, pipe in enumerate(pipes):  # warm-up: first runs allocate and specialise
            audio_ms(pipe, windows[:1])
            decode_rate(pipe, windows[0], 4)
        for _ in range(a.repeat):
            for i, pipe in enumerate(pipes):
                ms[i].append(audio_ms(pipe, windows))
                rate[i].append(decode_rate(pipe, windows[0], a.tokens, a.context_windows))
    import onnxruntime as ort
    import platform

    print(f"ONNX Runtime {ort.__version__} CPU, {a.threads or 'all'} thread(s), {platform.processor() or platform.machine()}; "
          f"model {pipes[0].model_name}; median of {a.repeat}{'; CSE off' if a.disable_cse else ''}; "
          f"decode after {a.context_windows} window(s) of speech tokens")  # fmt: skip
    base_ms, base_rate = statistics.median(ms[0]), statistics.median(rate[0])
    head = f"{'bundle':<28} {'target':<10} {'audio tower ms/window':>22} {'decode tokens/s':>18}"
    print(head)
    print("-" * len(head))
    for i, pipe in enumerate(pipes):
        m, r = statistics.median(ms[i]), statistics.median(rate[i])
        target = pipe.backend.bundle.manifest.get("target", "?")
        ratio_ms = f" ({base_ms / m:.2f}x)" if i else ""
        ratio_r = f" ({r / base_rate:.2f}x)" if i else ""
        print(f"{str(a.bundles[i])[-28:]:<28} {target:<10} {f'{m:.1f}{ratio_ms}':>22} {f'{r:.1f}{ratio_r}':>18}")


if __name__ == "__main__":
    main()
