"""TensorRT on a GPU: the native backend against ONNX Runtime (issue #6's GPU assertions).

Skipped cleanly without a CUDA GPU, TensorRT (`tensorrt` or `tensorrt_rtx`) and cuda-python.
TensorRT for RTX runs on RTX-class GPUs only (compute capability 7.5, 8.0, 8.6, 8.9, 12.x); on an
H200 (9.0) its runtime refuses every engine (measured 2026-11-25), so on Hopper and datacenter
Blackwell these tests need full TensorRT instead.

    pytest -m gpu tests/test_trt_gpu.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    from fastslm.runtime.errors import FastSLMError
    from fastslm.runtime.trt_compat import current_device, import_tensorrt, parse_cc, rtx_runs_on, rtx_unsupported_message

    try:
        _, flavour = import_tensorrt()
    except FastSLMError as exc:
        return str(exc)
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install 'fastslm[trt]')"
    device = current_device()
    if device is None:
        return "no CUDA GPU visible"
    if flavour == "tensorrt_rtx" and not rtx_runs_on(parse_cc(device.compute_capability)):
        return rtx_unsupported_message(device)  # measured on an H200, see docs/TENSORRT.md
    return None


SKIP = _skip_reason()
if SKIP:
    pytest.skip(SKIP, allow_module_level=True)

from fastslm.export.tensorrt_build import BuildOptions, build_bundle_engines  # noqa: E402
from fastslm.runtime.bundle import MANIFEST_FILE, sha256_file  # noqa: E402
from fastslm.runtime.kv_cache import KVCache  # noqa: E402
from fastslm.runtime.trt_compat import ENGINE_MANIFEST_FILE, import_tensorrt  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def export(model: Path, out: Path, target: str) -> Path:
    from fastslm.export.bundle_writer import ExportOptions, export_bundle

    export_bundle(ExportOptions(model=model, out=out, target=target, force=True, progress=False))
    return out


def trt_bundle(model: Path, out: Path, *, max_windows: int = 4, max_context: int | None = None) -> Path:
    """A trt-fp16 bundle: through `fastslm-export --target trt-fp16` once that target exists, else
    an onnx-fp16 bundle with engines built into it and its manifest pointed at the TensorRT runtime."""
    from fastslm.export.targets import TARGETS

    if "trt-fp16" in TARGETS:
        return export(model, out, "trt-fp16")
    export(model, out, "onnx-fp16")
    _, flavour = import_tensorrt()
    options = BuildOptions(progress=False, compute_capabilities=("current",) if flavour == "tensorrt_rtx" else ())
    build_bundle_engines(out, "trt-fp16", options, max_windows=max_windows, max_context=max_context)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest.update(target="trt-fp16", runtime="tensorrt")
    for name in ("audio_tower.engine", "llm.engine", ENGINE_MANIFEST_FILE):
        manifest["files"][name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from fastslm.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("trt_gpu")
    build_tiny_model(root / "model")
    return {
        "model": root / "model",
        "onnx": export(root / "model", root / "onnx", "onnx"),
        "trt": trt_bundle(root / "model", root / "trt", max_context=256),
    }


@pytest.fixture(scope="module")
def backends(tiny):
    from fastslm.runtime.onnx_backend import OnnxBackend
    from fastslm.runtime.trt_backend import TrtBackend

    trt = TrtBackend.from_bundle(tiny["trt"])
    yield OnnxBackend.from_bundle(tiny["onnx"], providers="cpu"), trt
    trt.close()


def test_fp16_speech_tokens_match_onnx_fp32(backends):
    onnx, trt = backends
    mel = np.random.default_rng(0).standard_normal((6, onnx.n_mels, 3000)).astype(np.float32) * 0.5
    want, got = onnx.encode_windows(mel), trt.encode_windows(mel)  # 6 windows: batches of 4 and 2
    assert got.shape == want.shape and got.dtype == np.float32
    for w in range(len(mel)):
        assert cosine(got[w], want[w]) >= 0.999, f"window {w}"


def test_llm_prefill_and_decode_match_onnx_fp32(backends):
    onnx, trt = backends
    rng = np.random.default_rng(1)
    prompt = rng.standard_normal((40, onnx.hidden_size)).astype(np.float32) * 0.05
    steps = rng.standard_normal((5, onnx.hidden_size)).astype(np.float32) * 0.05
    (lo, co), (lt, ct) = onnx.decode(prompt, onnx.empty_cache()), trt.decode(prompt, trt.empty_cache())
    assert cosine(lt, lo) >= 0.999 and ct.length == co.length == 40
    for x in steps:
        (lo, co), (lt, ct) = onnx.decode(x[None], co), trt.decode(x[None], ct)
        assert cosine(lt, lo) >= 0.999
        assert int(np.argmax(lt)) == int(np.argmax(lo))
    np.testing.assert_allclose(np.asarray(ct.keys[0], np.float32), np.asarray(co.keys[0], np.float32), atol=2e-2)


def test_kv_cache_stays_on_the_device_and_buffers_are_reused(backends):
    from fastslm.runtime.trt_backend import DeviceTensor

    _, trt = backends
    x = np.zeros((1, trt.hidden_size), np.float32)
    _, cache = trt.decode(np.zeros((8, trt.hidden_size), np.float32), trt.empty_cache())
    _, cache = trt.decode(x, cache)
    buffers = sum(len(v) for v in trt._pool.idle.values())
    for _ in range(20):
        _, cache = trt.decode(x, cache)
        assert isinstance(cache.keys[0], DeviceTensor)
    assert sum(len(v) for v in trt._pool.idle.values()) == buffers
    host = cache.to_numpy()  # and a host copy loads back
    logits_a, _ = trt.decode(x, cache)
    logits_b, _ = trt.decode(x, KVCache(host.keys, host.values))
    np.testing.assert_array_equal(logits_a, logits_b)


def test_tiny_pipeline_runs_end_to_end(tiny, backends, jfk_path):
    """Pipeline + TensorRT backend on real audio (the random tiny model's words mean nothing)."""
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.sampling import SamplingOptions
    from fastslm.runtime.tokenizer import Tokenizer

    onnx, trt = backends
    tok = Tokenizer.from_file(tiny["trt"] / "tokenizer.json")
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=8)
    a = Pipeline(onnx, tok).generate(jfk_path, sampling=greedy)
    b = Pipeline(trt, tok).generate(jfk_path, sampling=greedy)
    assert (a.prompt_tokens, a.n_windows) == (b.prompt_tokens, b.n_windows)
    assert len(b.token_ids) <= 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastslm.runtime.loading import DEFAULT_MODEL_FOLDER

    if not (DEFAULT_MODEL_FOLDER / "config.json").is_file():
        pytest.skip(f"the demo model is not at {DEFAULT_MODEL_FOLDER}")
    root = tmp_path_factory.mktemp("trt_demo")  # exported from the model folder, as a user would
    return {"model": DEFAULT_MODEL_FOLDER, "onnx16": export(DEFAULT_MODEL_FOLDER, root / "onnx16", "onnx-fp16"),
            "trt": trt_bundle(DEFAULT_MODEL_FOLDER, root / "trt")}


def test_demo_greedy_tokens_identical_to_onnx_on_jfk(demo, jfk_path):
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.onnx_backend import OnnxBackend
    from fastslm.runtime.sampling import SamplingOptions
    from fastslm.runtime.tokenizer import Tokenizer
    from fastslm.runtime.trt_backend import TrtBackend

    tok = Tokenizer.from_file(demo["trt"] / "tokenizer.json")
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=64)
    want = Pipeline(OnnxBackend.from_bundle(demo["onnx16"]), tok).generate(jfk_path, "transcribe", sampling=greedy)
    got = Pipeline(TrtBackend.from_bundle(demo["trt"]), tok).generate(jfk_path, "transcribe", sampling=greedy)
    assert got.token_ids == want.token_ids, (got.text, want.text)


def test_int8_audio_engine_wer_within_one_point(demo, tmp_path):
    from fastslm.export.targets import TARGETS

    if "trt-int8" not in TARGETS:
        pytest.skip("the trt-int8 target comes with the calibration work")
    from fastslm.models.demo.evaluate import EVAL_SUBSET, load_split, transcribe_all, wer
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.tokenizer import Tokenizer
    from fastslm.runtime.trt_backend import TrtBackend

    corpus = Path(os.environ.get("FASTSLM_DEMO_CORPUS", EVAL_SUBSET))
    split = os.environ.get("FASTSLM_DEMO_EVAL_SPLIT", "eval_seen")
    int8 = export(demo["model"], tmp_path / "int8", "trt-int8")
    items = load_split(split, corpus, limit=40)
    tok = Tokenizer.from_file(demo["trt"] / "tokenizer.json")
    refs = [it.text for it in items]
    base = wer(refs, transcribe_all(Pipeline(TrtBackend.from_bundle(demo["trt"]), tok), [it.audio for it in items]))
    quant = wer(refs, transcribe_all(Pipeline(TrtBackend.from_bundle(int8), tok), [it.audio for it in items]))
    assert quant - base <= 1.0, f"INT8 audio tower WER {quant:.2f} vs fp16 {base:.2f}"


# ---------------------------------------------------------------------------------------------
# Parity per graph with polygraphy (TensorRT vs ONNX Runtime), the tooling


POLYGRAPHY_TOLERANCE = {"fp16": ("2e-2", "2e-2"), "fp32": ("1e-4", "1e-4")}  # atol, rtol on the mean error


@pytest.mark.parametrize("graph, shapes, ranges", [
    ("audio_tower", "mel:[2,80,3000]", []),
    ("llm", None, ["--val-range", "logits_index:[2,2]", "position_ids:[0,2]", "inputs_embeds:[-0.05,0.05]"]),
])
def test_polygraphy_trt_vs_onnxruntime(tiny, graph, shapes, ranges, tmp_path):
    if shutil.which("polygraphy") is None:
        pytest.skip("polygraphy is not installed")
    bundle = tiny["trt"]
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    entry = manifest["graphs"][graph]
    if shapes is None:  # prefill of 3 positions after an empty past
        parts = []
        for t in entry["inputs"]:
            sizes = {"batch": 1, "seq": 3, "past": 0, "keep": 1}
            parts.append(f"{t['name']}:[{','.join(str(sizes.get(d, d)) for d in t['shape'])}]")
        shapes = " ".join(parts)
    _, flavour = import_tensorrt()
    atol, rtol = POLYGRAPHY_TOLERANCE[entry["precision"]]
    cmd = ["polygraphy", "run", str(bundle / entry["file"]), "--trt", "--onnxrt", "--input-shapes", *shapes.split(),
           *ranges, "--atol", atol, "--rtol", rtol, "--check-error-stat", "mean"]
    env = {**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1" if flavour == "tensorrt_rtx" else "0"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED" in result.stdout + result.stderr
