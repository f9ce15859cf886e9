"""Per-stage metrics of one fastslm variant, measured in process on one 30 s window of speech.

    audio tower     ms per window (one window a call)
    prefill         prompt + speech tokens of one window, and its ms
    frame baseline  the same LLM prefilled with a frame-level adapter's 25 tokens/s (750 per 30 s window):
                    the speech tokens repeated to that count, so the cost of 750 against this model's
                    tokens per window is measured on the real graph, not asserted
    first token     mel + audio tower + prefill + first greedy token, from samples in memory
    decode          tokens/s of single-token steps after the prefill
    weights/token   bytes of LLM weights read per decode step, and what that rate needs in GB/s
                    against the machine's measured copy bandwidth (the physical limit)
"""

from __future__ import annotations

import statistics
import time
import numpy as np

from ..audio import audio_to_windows
from ..generate import SpeechTokens

FRAME_LEVEL_TOKENS_PER_WINDOW = 750  # a 25 Hz frame-level adapter over a 30 s window


def memory_bandwidth_gbs(megabytes: int = 512, repeat: int = 5, threads: int = 1) -> float:
    """Best copy bandwidth (read + write bytes per second) of a buffer far larger than any cache.

    With `threads`, each copies its own slice at the same time (numpy releases the GIL while
    copying): a decode step's GEMMs read the weights on every core.
    """
    import threading

    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    best = float("inf")
    for _ in range(repeat):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(bounds, bounds[1:])]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def llm_weight_bytes(pipe) -> int:
    """Bytes of LLM weights a decode step reads: the decoder graph's weights plus one embedding row."""
    backend = pipe.backend
    bundle = getattr(backend, "bundle", None)
    if bundle is not None:
        graph = bundle.graph("llm")
        files = [graph["file"]] + ([graph["data_file"]] if graph.get("data_file") else [])
        graph_bytes = sum((bundle.path / f).stat().st_size for f in files)
        if bundle.manifest.get("target") == "onnx-fp16w":
            graph_bytes = _fp32_bytes(bundle.path / graph["file"])  # fp16 on disk, fp32 in the session
        row = backend._embed.shape[1] * backend._embed.dtype.itemsize
        return graph_bytes + row
    model = getattr(backend, "model", None)  # the PyTorch reference
    return sum(p.numel() * p.element_size() for p in model.llm.parameters())


def _fp32_bytes(path) -> int:
    """Initializer bytes once fp16-stored weights are cast to fp32 (onnx-fp16w)."""
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(path), load_external_data=False).graph
    size = {TensorProto.FLOAT16: 2, TensorProto.FLOAT: 4, TensorProto.INT64: 8, TensorProto.INT32: 4}
    total = 0
    for init in graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * (4 if init.data_type == TensorProto.FLOAT16 else size.get(init.data_type, 1))
    return total


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(pipe, samples: np.ndarray, repeat: int = 3, decode_tokens: int = 64) -> dict:
    """Stage metrics on one window made from `samples` (<= 30 s at 16 kHz)."""
    from ...calibration.bench import audio_ms, decode_rate

    b = pipe.backend
    mel = audio_to_windows(samples, b.n_mels)  # (1, n_mels, 3000)
    audio_tower_ms = statistics.median(audio_ms(pipe, mel) for _ in range(repeat))
    tokens = b.encode_windows(mel)  # (1, Q, H)
    speech = SpeechTokens(tokens.reshape(-1, tokens.shape[-1]), 1, len(samples) / 16000)
    prefill_s, prefill = _timed(lambda: pipe.prefill(speech, "transcribe"), repeat)
    reps = -(-FRAME_LEVEL_TOKENS_PER_WINDOW // len(speech.embeddings))
    frame = SpeechTokens(np.tile(speech.embeddings, (reps, 1))[:FRAME_LEVEL_TOKENS_PER_WINDOW], 1, speech.seconds)
    frame_s, frame_prefill = _timed(lambda: pipe.prefill(frame, "transcribe"), repeat)

    def first_token():
        s = pipe.encode(samples, 16000)
        p = pipe.prefill(s, "transcribe")
        return int(np.argmax(p.logits))

    ttft_s, _ = _timed(first_token, repeat)
    rate = statistics.median(decode_rate(pipe, mel[0], decode_tokens) for _ in range(repeat))
    weight_bytes = llm_weight_bytes(pipe)
    return {
        "audio_tower_ms_per_window": round(audio_tower_ms, 1),
        "prefill_tokens": prefill.prompt_tokens,
        "prefill_ms": round(prefill_s * 1000, 2),
        "frame_prefill_tokens": frame_prefill.prompt_tokens,
        "frame_prefill_ms": round(frame_s * 1000, 2),
        "ttft_ms": round(ttft_s * 1000, 1),
        "decode_tokens_per_s": round(rate, 1),
        "llm_weight_mb_per_token": round(weight_bytes / 1e6, 2),
        "decode_weight_gbs": round(weight_bytes * rate / 1e9, 2),
    }
