"""The ONNX Runtime backend against the PyTorch reference, and fastslm-run on bundles.

Parity (per model folder in MODEL_FOLDERS; the shipped demo model joins once it exists):
speech tokens and LLM logits from ORT vs PyTorch (fp32: max |diff| <= 5e-5 of the largest output; fp16: cosine >=
0.999), and the first 64 greedy tokens through the same `Pipeline` loop. fp16 sessions are
created only in a child process, so an onnxruntime crash fails a test instead of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from fastslm.export.bundle_writer import ExportOptions, export_bundle
from fastslm.models.fastslm import FastSLM
from fastslm.models.tiny import build_tiny_model, tiny_config
from fastslm.models.torch_backend import TorchBackend
from fastslm.runtime import kv_buffers
from fastslm.runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from fastslm.runtime.bundle import load_bundle, sha256_file
from fastslm.runtime.cli import app as run_app
from fastslm.runtime.errors import OptionError
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.kv_cache import KVCache
from fastslm.runtime.loading import DEFAULT_MODEL_DIR, DEFAULT_MODEL_FOLDER, load_pipeline
from fastslm.runtime.prompt import Task, build_prompt
from fastslm.runtime.onnx_backend import (
    OnnxBackend, in_place_cache_refused, loads_in_place_cache, resolve_providers, session_options, tensorrt_profile,
)
from fastslm.runtime.sampling import SamplingOptions
from fastslm.runtime.tokenizer import Tokenizer

# fp32 parity as the largest difference over the largest magnitude of the reference output: the
# rounding of a deep fp32 network scales with its activations, and x86 kernels (AVX2 vs AVX-512,
# MKL vs MLAS) round differently. Measured on the demo model's 95 s speech tokens (up to 17.7):
# 1.6e-6 with torch's AVX-512 kernels, 1.2e-5 with its AVX2 ones (ATEN_CPU_CAPABILITY=avx2
# MKL_ENABLE_INSTRUCTIONS=AVX2), as on an AVX2-only EPYC (2.07e-4 absolute). A broken graph is
# off by 1e-2 or more.
FP32_RTOL = 5e-5
FP16_MIN_COSINE = 0.999
GREEDY_TOKENS = 64
# A greedy choice may legitimately flip where PyTorch's top two logits are closer than the
# backends' logit error: fp32 ORT differs by ~1e-5, fp16 by ~3e-2 (measured on the tiny model).
FP32_TIE = 1e-3
FP16_TIE = 0.25


def build_varied_tiny(folder: Path) -> Path:
    """A tiny random model whose greedy answers vary (see build_tiny_model's varied_llm)."""
    build_tiny_model(folder, seed=2, varied_llm=True)
    return folder


# The model folders every parity test runs on. The shipped demo model joins by itself once
# models/demo/shipped/model exists (until then listing it would only add a skip per test).
MODEL_FOLDERS = [pytest.param("tiny", id="tiny")]
if DEFAULT_MODEL_FOLDER.is_dir():
    MODEL_FOLDERS.append(pytest.param("demo", id="demo", marks=pytest.mark.slow))


@pytest.fixture(scope="module", params=MODEL_FOLDERS)
def model_dir(request, tmp_path_factory) -> Path:
    if request.param == "demo":
        return DEFAULT_MODEL_FOLDER
    return build_varied_tiny(tmp_path_factory.mktemp("tiny-varied"))


@pytest.fixture(scope="module")
def bundles(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    export_bundle(ExportOptions(model=model_dir, out=root / "fp32", progress=False), log=lambda line: None)
    # fp16: in a child process, because the exporter's own validation opens an fp16 session.
    result = run_python("-m", "fastslm.export.cli", "--model", str(model_dir), "--out", str(root / "fp16"), "--target", "onnx-fp16")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"fp32": root / "fp32", "fp16": root / "fp16"}


@pytest.fixture(scope="module")
def reference(model_dir) -> FastSLM:
    return FastSLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def ort_fp32(bundles) -> OnnxBackend:
    return OnnxBackend.from_bundle(bundles["fp32"], threads=1, max_windows_per_batch=3)


@pytest.fixture(scope="module")
def long_audio(jfk_path) -> np.ndarray:
    """95 s = 4 windows: jfk.flac eight times (88 s), then 7 s of silence."""
    jfk = load_audio(jfk_path)
    samples = np.concatenate([np.tile(jfk, 8), np.zeros(95 * SAMPLE_RATE - 8 * len(jfk), np.float32)])
    assert len(audio_to_windows(samples, n_mels=80)) == 4
    return samples


def run_python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


class NoStopTokenizer(Tokenizer):
    """Greedy runs compare exactly GREEDY_TOKENS tokens, whatever a random model emits."""

    eos_ids = ()


class Recorder:
    """Wraps a backend and keeps the logits the loop decides each token from."""

    def __init__(self, backend):
        self.backend, self.logits = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def decode(self, embeds, cache):
        logits, cache = self.backend.decode(embeds, cache)
        self.logits.append(logits)
        return logits, cache


def greedy(backend, tokenizer_path: Path, audio) -> tuple[list[int], np.ndarray]:
    recorder = Recorder(backend)
    pipe = Pipeline(recorder, NoStopTokenizer.from_file(tokenizer_path))
    rate = SAMPLE_RATE if isinstance(audio, np.ndarray) else None
    # a random model loops: without stop_loops=False its answer would end before GREEDY_TOKENS
    options = SamplingOptions(max_new_tokens=GREEDY_TOKENS, stop_loops=False)
    result = pipe.generate(audio, "transcribe", sample_rate=rate, sampling=options)
    # generate() builds the audio prefix first (decode calls whose logits decide no token), so the
    # answer's tokens are decided by the last GREEDY_TOKENS calls.
    logits = np.array(recorder.logits[-GREEDY_TOKENS:]).reshape(GREEDY_TOKENS, -1)
    assert [int(t) for t in logits.argmax(-1)] == list(result.token_ids), "recorded logits are not the deciding ones"
    return result.token_ids, logits


def assert_greedy_agrees(ref: list[int], ref_logits: np.ndarray, got: list[int], tie: float, label: str) -> int:
    """Same tokens, except that a flip is allowed where PyTorch's top-2 gap is below `tie`
    (after a flip the two sequences continue from different prefixes and are not compared).
    Returns how many leading tokens agree."""
    assert len(ref) == len(got) == GREEDY_TOKENS
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            top2 = np.sort(ref_logits[i])[-2:]
            gap = float(top2[1] - top2[0])
            assert gap <= tie, f"{label}: token {i} is {b}, PyTorch says {a} with a top-2 gap of {gap:.3g} > {tie}"
            return i
    return len(ref)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| over max |expected| (see FP32_RTOL)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


# ---- fp32 parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["jfk", "95 s"])
def test_speech_tokens_fp32(which, reference, ort_fp32, jfk_path, long_audio):
    samples = load_audio(jfk_path) if which == "jfk" else long_audio
    windows = audio_to_windows(samples, n_mels=reference.config.n_mels)
    with torch.no_grad():
        expected = reference.encode_audio(torch.from_numpy(windows)).numpy()
    got = ort_fp32.encode_windows(windows)  # 4 windows run as batches of 3 + 1
    assert got.shape == expected.shape == (len(windows), reference.config.tokens_per_window, reference.config.qwen3.hidden_size)
    error = relative_error(got, expected)
    print(f"speech tokens fp32 {which}: max |ORT - PyTorch| / max |PyTorch| {error:.2e}")
    assert error <= FP32_RTOL


def prompt_embeds(reference: FastSLM, tokenizer_path: Path, windows: np.ndarray) -> np.ndarray:
    """The prefill input the pipeline builds: text left of <|AUDIO|>, speech tokens, text right of it."""
    ids = Tokenizer.from_file(tokenizer_path).encode_prompt(build_prompt(Task.ASR, Task.ASR.default_instruction))
    with torch.no_grad():
        speech = reference.encode_audio(torch.from_numpy(windows)).flatten(0, 1)  # (W * Q, H)
        parts = [reference.llm.embed(torch.tensor(ids.left)), speech, reference.llm.embed(torch.tensor(ids.right))]
    return torch.cat(parts).numpy()


def test_llm_logits_fp32_prefill_then_decode(reference, ort_fp32, bundles, jfk_path):
    windows = audio_to_windows(load_audio(jfk_path), n_mels=reference.config.n_mels)
    embeds = prompt_embeds(reference, bundles["fp32"] / "tokenizer.json", windows)
    llm = reference.llm
    with torch.no_grad():
        ref = llm(inputs_embeds=torch.from_numpy(embeds)[None])  # every position's logits
    logits, cache = ort_fp32.run_llm(embeds, ort_fp32.empty_cache())  # zero-length past
    diffs = {"prefill logits": relative_error(logits, ref.logits[0].numpy())}
    diffs["prefill KV"] = max(relative_error(a, b.numpy()) for a, b in zip(cache.keys + cache.values, ref.past.keys + ref.past.values))
    ref_cache = ref.past
    token = int(ref.logits[0, -1].argmax())
    for step in range(8):  # decode steps with a growing past
        x = ort_fp32.embed_tokens(np.array([token]))
        np.testing.assert_array_equal(x, llm.embed(torch.tensor([token])).detach().numpy())
        got, cache = ort_fp32.decode(x, cache)
        with torch.no_grad():
            out = llm(inputs_embeds=torch.from_numpy(x)[None], past=ref_cache, last_only=True)
        ref_cache = out.past
        diffs[f"decode {step}"] = relative_error(got, out.logits[0, -1].numpy())
        token = int(out.logits[0, -1].argmax())
    diffs["final KV"] = max(relative_error(a, b.numpy()) for a, b in zip(cache.keys + cache.values, ref_cache.keys + ref_cache.values))
    print("LLM fp32 max |ORT - PyTorch| / max |PyTorch|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert cache.length == len(embeds) + 8
    assert max(diffs.values()) <= FP32_RTOL, diffs


def test_chunked_prefill_equals_one_prefill(ort_fp32, reference, bundles, jfk_path):
    """A prompt fed in two chunks (the second with a past) gives the one-shot logits."""
    windows = audio_to_windows(load_audio(jfk_path), n_mels=reference.config.n_mels)
    embeds = prompt_embeds(reference, bundles["fp32"] / "tokenizer.json", windows)
    whole, _ = ort_fp32.run_llm(embeds, ort_fp32.empty_cache())
    _, cache = ort_fp32.run_llm(embeds[:7], ort_fp32.empty_cache())
    tail, cache = ort_fp32.run_llm(embeds[7:], cache)
    assert relative_error(tail, whole[7:]) <= FP32_RTOL and cache.length == len(embeds)
    only_last, _ = ort_fp32.run_llm(embeds, ort_fp32.empty_cache(), np.array([len(embeds) - 1]))
    assert only_last.shape == (1, whole.shape[1]) and relative_error(only_last[0], whole[-1]) <= FP32_RTOL
    # decode() splits a long prompt into prefill_chunk calls (5 positions here: several chunks and a short tail)
    chunked = OnnxBackend(ort_fp32.bundle, prefill_chunk=5)
    last, cache = chunked.decode(embeds, chunked.empty_cache())
    assert relative_error(last, whole[-1]) <= FP32_RTOL and cache.length == len(embeds)


@pytest.mark.parametrize("which", ["jfk", "95 s"])
def test_greedy_tokens_fp32(which, reference, ort_fp32, bundles, jfk_path, long_audio):
    audio = jfk_path if which == "jfk" else long_audio
    tokenizer = bundles["fp32"] / "tokenizer.json"
    ref, ref_logits = greedy(TorchBackend(reference), tokenizer, audio)
    got, _ = greedy(ort_fp32, tokenizer, audio)
    agreed = assert_greedy_agrees(ref, ref_logits, got, FP32_TIE, f"fp32 {which}")
    gaps = np.diff(np.sort(ref_logits, axis=1)[:, -2:], axis=1)
    print(f"greedy fp32 {which}: {agreed}/{GREEDY_TOKENS} tokens identical, {len(set(ref))} distinct, "
          f"smallest top-2 gap {gaps.min():.3g}")  # fmt: skip
    assert len(set(ref)) > 1 or which == "95 s"  # the varied tiny model answers with several tokens
    if gaps.min() > FP32_TIE:  # no near-tie anywhere: every token must match
        assert agreed == GREEDY_TOKENS


# ---- the KV cache kept in place ---------------------------------------------------------------


@pytest.fixture(scope="module")
def copying_bundle(model_dir, tmp_path_factory) -> Path:
    """`--decoder-cache copied`: an fp32 bundle whose LLM graph has no past_length input (past and
    new concatenated into present), the form every onnxruntime loads and TensorRT bundles keep."""
    out = tmp_path_factory.mktemp("copying") / "fp32"
    export_bundle(ExportOptions(model=model_dir, out=out, progress=False, decoder_cache="copied"), log=lambda line: None)
    return out


def decoder_form(bundle: Path) -> tuple[str, bool, bool]:
    """(the manifest's decoder_cache, a past_length input declared, GroupQueryAttention in the graph file)."""
    import onnx

    llm = json.loads((bundle / "manifest.json").read_text())["graphs"]["llm"]
    ops = {node.op_type for node in onnx.load(str(bundle / llm["file"]), load_external_data=False).graph.node}
    return llm["decoder_cache"], "past_length" in [t["name"] for t in llm["inputs"]], "GroupQueryAttention" in ops


def test_decoder_cache_is_honoured_and_recorded(bundles, copying_bundle):
    assert decoder_form(bundles["fp32"]) == ("in-place", True, True)  # onnx: the CPU targets' default
    assert decoder_form(bundles["fp16"]) == ("copied", False, False)  # onnx-fp16: the GPU target's default
    assert decoder_form(copying_bundle) == ("copied", False, False)  # --decoder-cache copied


@pytest.mark.parametrize("version, loads", [("1.20.0", False), ("1.31.1", False), ("1.32.0", True),
                                            ("1.33.0.dev20261201", True), ("2.0.0", True), ("custom", True)])  # fmt: skip
def test_which_onnxruntime_loads_the_in_place_cache(version, loads):
    assert loads_in_place_cache(version) is loads


def test_in_place_bundle_on_an_older_onnxruntime(bundles, copying_bundle, jfk_path, monkeypatch):
    """One line naming the export command that makes a bundle that onnxruntime loads; the copied form is not refused.
    (A real onnxruntime 1.21.1 to 1.31.1 refuses the graph itself: docs/BENCHMARKS.md "Decoder cache forms".)"""
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    one_error_line(run_cli("--model", str(bundles["fp32"]), str(jfk_path)), "onnxruntime 1.31.1 cannot load",
                   "needs onnxruntime >= 1.32", "`fastslm-export --model MODEL_FOLDER --target onnx --decoder-cache "
                   "copied --out fp32-copied`", "model folder it was exported from")  # fmt: skip
    assert not OnnxBackend.from_bundle(copying_bundle, threads=1).cache_in_place
    if DEFAULT_MODEL_DIR.is_dir():  # the shipped bundle: the command names the shipped model folder
        line = in_place_cache_refused(load_bundle(DEFAULT_MODEL_DIR, verify=False))
        assert f"--model {DEFAULT_MODEL_FOLDER} --target onnx-int8 --decoder-cache copied" in line, line


def test_cache_in_place_gives_the_copying_graphs_tokens(ort_fp32, copying_bundle, bundles, jfk_path):
    copying = OnnxBackend.from_bundle(copying_bundle, threads=1)
    assert ort_fp32.cache_in_place and not copying.cache_in_place
    tokenizer = bundles["fp32"] / "tokenizer.json"
    before, before_logits = greedy(copying, tokenizer, jfk_path)
    after, after_logits = greedy(ort_fp32, tokenizer, jfk_path)
    agreed = assert_greedy_agrees(before, before_logits, after, FP32_TIE, "in place vs copying graph")
    gaps = np.diff(np.sort(before_logits, axis=1)[:, -2:], axis=1)
    print(f"cache in place: {agreed}/{GREEDY_TOKENS} greedy tokens as the copying graph's, "
          f"logits max rel. diff {relative_error(after_logits[:agreed], before_logits[:agreed]):.2e}")  # fmt: skip
    assert relative_error(after_logits[:agreed], before_logits[:agreed]) <= FP32_RTOL
    if gaps.min() > FP32_TIE:
        assert agreed == GREEDY_TOKENS


def test_cache_in_place_keeps_every_cache_a_value(ort_fp32, reference, bundles, jfk_path, monkeypatch):
    """Caches handed out are views of the buffers the graph appends to: a kept prefix asked twice,
    chunked prefill across a buffer's growth and batch rows must give exactly the numbers of
    feeding the same graph exact-length copies."""
    monkeypatch.setattr(kv_buffers, "GROW_ROWS", 8)  # buffers grow several times over the prompt
    windows = audio_to_windows(load_audio(jfk_path), n_mels=reference.config.n_mels)
    embeds = prompt_embeds(reference, bundles["fp32"] / "tokenizer.json", windows)
    questions = [ort_fp32.embed_tokens(np.array([t, t + 1])) for t in (5, 9)]

    def run(in_place: bool) -> list[np.ndarray]:
        backend = OnnxBackend(ort_fp32.bundle, threads=1, prefill_chunk=16)
        backend.cache_in_place = in_place
        _, prefix = backend.decode(embeds, backend.empty_cache())
        out = []
        for q in questions:  # the same prefix, two questions, then the first answer continued
            out.append(backend.decode(q, prefix)[0])
        _, cache = backend.decode(questions[0], prefix)
        logits, cache = backend.decode(questions[1][:1], cache)
        out.append(logits)
        rows = KVCache([np.repeat(k, 2, axis=0) for k in prefix.keys], [np.repeat(v, 2, axis=0) for v in prefix.values])
        logits, rows = backend.decode_rows(np.stack(questions), rows)
        out.append(logits)
        logits, rows = backend.decode_rows(np.stack(questions)[:, :1], rows)
        out.append(logits)
        assert cache.length == len(embeds) + 3 and rows.length == len(embeds) + 3
        out += [np.asarray(prefix.keys[-1]), np.asarray(cache.values[0])]  # views still hold their rows
        return out

    for got, want in zip(run(True), run(False)):
        np.testing.assert_array_equal(got, want)


# ---- fp16, in a child process ------------------------------------------------------------------

FP16_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fastslm.runtime.onnx_backend import OnnxBackend
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.sampling import SamplingOptions
    from fastslm.runtime.tokenizer import Tokenizer

    bundle, inputs, out = sys.argv[1:4]
    data = np.load(inputs)
    backend = OnnxBackend.from_bundle(bundle, threads=1)
    result = {"kv_dtype": np.array(str(backend.empty_cache().keys[0].dtype))}
    result["tokens_jfk"] = backend.encode_windows(data["windows_jfk"])
    result["tokens_long"] = backend.encode_windows(data["windows_long"])
    logits, cache = backend.run_llm(data["embeds"], backend.empty_cache())
    result["prefill"] = logits
    steps = []
    for token in data["decode_ids"]:
        step, cache = backend.decode(backend.embed_tokens(np.array([token])), cache)
        steps.append(step)
    result["decode"] = np.array(steps)

    class NoStop(Tokenizer):
        eos_ids = ()

    class Recorder:
        def __init__(self, b): self.b, self.logits = b, []
        def __getattr__(self, k): return getattr(self.b, k)
        def decode(self, e, c):
            l, c = self.b.decode(e, c); self.logits.append(l); return l, c

    for name, audio in (("jfk", data["audio_jfk"]), ("long", data["audio_long"])):
        rec = Recorder(backend)
        pipe = Pipeline(rec, NoStop.from_file(bundle + "/tokenizer.json"))
        r = pipe.generate(audio, "transcribe", sample_rate=16000, sampling=SamplingOptions(max_new_tokens=int(data["n"]), stop_loops=False))
        result["greedy_" + name] = np.array(r.token_ids)
        result["greedy_logits_" + name] = np.array(rec.logits[-int(data["n"]):])
    np.savez(out, **result)
    """
)


@pytest.fixture(scope="module")
def fp16_run(bundles, reference, ort_fp32, jfk_path, long_audio, tmp_path_factory):
    """Everything the fp16 tests compare, computed by the fp16 bundle in a child process."""
    folder = tmp_path_factory.mktemp("fp16")
    n_mels = reference.config.n_mels
    jfk = load_audio(jfk_path)
    windows_jfk = audio_to_windows(jfk, n_mels=n_mels)
    embeds = prompt_embeds(reference, bundles["fp32"] / "tokenizer.json", windows_jfk)
    with torch.no_grad():
        first = int(reference.llm(inputs_embeds=torch.from_numpy(embeds)[None], last_only=True).logits[0, -1].argmax())
    inputs = dict(
        windows_jfk=windows_jfk, windows_long=audio_to_windows(long_audio, n_mels=n_mels), embeds=embeds,
        decode_ids=np.array([first, 7, 42, 3, 100, 9], dtype=np.int64), audio_jfk=jfk, audio_long=long_audio,
        n=np.array(GREEDY_TOKENS),
    )  # fmt: skip
    np.savez(folder / "inputs.npz", **inputs)
    started = time.perf_counter()
    result = run_python("-c", FP16_CHILD, str(bundles["fp16"]), str(folder / "inputs.npz"), str(folder / "out.npz"))
    # A segfault (onnxruntime 1.32 + fp16 + ORT_ENABLE_ALL on CPU) shows here as a negative return code.
    assert result.returncode == 0, f"fp16 child died (rc {result.returncode}): {result.stderr[-3000:]}"
    print(f"fp16 child: {time.perf_counter() - started:.1f} s")
    return inputs, dict(np.load(folder / "out.npz"))


def test_fp16_bundle_manifest(bundles):
    manifest = json.loads((bundles["fp16"] / "manifest.json").read_text())
    assert (manifest["target"], manifest["precision"]) == ("onnx-fp16", "fp16")
    assert manifest["embeddings"]["dtype"] == "float16" and np.load(bundles["fp16"] / "embed_tokens.npy").dtype == np.float16
    io = {t["name"]: t["dtype"] for g in manifest["graphs"].values() for t in g["inputs"] + g["outputs"]}
    # The runtime's side of the graphs stays fp32; the KV cache is kept in fp16 (half the memory).
    assert io["mel"] == io["speech_tokens"] == io["inputs_embeds"] == io["logits"] == "float32"
    assert io["past_key_values.0.key"] == io["present.0.value"] == "float16"
    for graph in manifest["graphs"].values():
        for case in graph["validation"]["cases"].values():
            assert all(o["min_cosine"] >= FP16_MIN_COSINE for o in case.values()), case


def test_fp16_speech_tokens(fp16_run, reference):
    inputs, out = fp16_run
    for key, windows in (("tokens_jfk", inputs["windows_jfk"]), ("tokens_long", inputs["windows_long"])):
        with torch.no_grad():
            expected = reference.encode_audio(torch.from_numpy(windows)).numpy()
        c = cosine(out[key], expected)
        print(f"speech tokens fp16 {key}: cosine {c:.6f}, max |diff| {np.abs(out[key] - expected).max():.2e}")
        assert out[key].dtype == np.float32 and c >= FP16_MIN_COSINE


def test_fp16_llm_logits(fp16_run, reference):
    inputs, out = fp16_run
    assert str(out["kv_dtype"]) == "float16"
    llm = reference.llm
    with torch.no_grad():
        ref = llm(inputs_embeds=torch.from_numpy(inputs["embeds"])[None])
        cache, steps = ref.past, []
        for token in inputs["decode_ids"]:
            step = llm(input_ids=torch.tensor([[token]]), past=cache, last_only=True)
            cache = step.past
            steps.append(step.logits[0, -1].numpy())
    c_prefill = min(cosine(a, b) for a, b in zip(out["prefill"], ref.logits[0].numpy()))  # per position
    c_decode = min(cosine(a, b) for a, b in zip(out["decode"], steps))
    print(f"LLM fp16: worst per-position cosine prefill {c_prefill:.6f}, decode {c_decode:.6f}")
    assert c_prefill >= FP16_MIN_COSINE and c_decode >= FP16_MIN_COSINE


def test_fp16_greedy_agrees_with_fp32(fp16_run, ort_fp32, bundles, jfk_path, long_audio):
    _, out = fp16_run
    for name, audio in (("jfk", jfk_path), ("long", long_audio)):
        ref, ref_logits = greedy(ort_fp32, bundles["fp32"] / "tokenizer.json", audio)
        got = [int(t) for t in out["greedy_" + name]]
        agreed = assert_greedy_agrees(ref, ref_logits, got, FP16_TIE, f"fp16 {name}")
        print(f"greedy fp16 vs fp32 {name}: {agreed}/{GREEDY_TOKENS} leading tokens identical")


# ---- backend options -------------------------------------------------------------------------


def test_session_options_avoid_the_fp16_cpu_crash():
    cpu, cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_options("fp16", cpu).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert session_options("fp32", cpu).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options("fp16", cuda).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options("fp32", cpu, threads=1).intra_op_num_threads == 1


# Prints how far the first run of the graph at argv[2] raises the process's peak RSS (MiB).
_FIRST_RUN_GROWTH = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    from fastslm.runtime.onnx_backend import session_options
    if sys.argv[1] == "fastslm":
        options = session_options("fp16", ["CPUExecutionProvider"])
    else:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(sys.argv[2], options, providers=["CPUExecutionProvider"])
    peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
    before = peak()
    session.run(None, {"x": np.ones((1, 2048), np.float16)})
    print(peak() - before)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_fp16_graphs_on_cpu_hold_one_fp32_weight_at_a_time(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # 12 chained MatMuls with 16 MiB fp32 weights; the default order casts all 12 before the first MatMul.
    width, layers, nodes, weights, x = 2048, 12, [], [], "x"
    rng = np.random.default_rng(0)
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float16)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, width]) for n in ("x", x)]
    graph = helper.make_graph(nodes, "chain", io[:1], io[1:], weights)
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    grown = {}
    for options in ("default", "fastslm"):
        done = subprocess.run([sys.executable, "-c", _FIRST_RUN_GROWTH, options, str(path)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        grown[options] = float(done.stdout.split()[-1])
    print(f"first run's peak RSS growth, MiB: {grown}")  # default: 193 MiB in onnxruntime 1.32
    assert grown["fastslm"] < 3 * 16, grown


def test_providers():
    available = ort.get_available_providers()
    best = resolve_providers()
    assert best[-1] == "CPUExecutionProvider" and all(p in available for p in best)
    assert resolve_providers("cpu") == resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(OptionError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
            resolve_providers("CUDAExecutionProvider,CPUExecutionProvider")
    with pytest.raises(OptionError, match="empty"):
        resolve_providers([])


def test_tensorrt_profile_strings():
    graph = {
        "inputs": [{"name": "inputs_embeds", "shape": ["batch", "seq", 64]}, {"name": "past_key_values.0.key", "shape": ["batch", 2, "past", 16]}],
        "dims": {"batch": {"min": 1, "opt": 1, "max": 4}, "seq": {"min": 1, "opt": 1, "max": 4096}, "past": {"min": 0, "opt": 1024, "max": 4096}},
    }  # fmt: skip
    profile = tensorrt_profile(graph)
    assert profile["trt_profile_min_shapes"] == "inputs_embeds:1x1x64,past_key_values.0.key:1x2x0x16"
    assert profile["trt_profile_max_shapes"] == "inputs_embeds:4x4096x64,past_key_values.0.key:4x2x4096x16"


def test_load_pipeline_picks_the_backend(bundles, model_dir):
    pipe = load_pipeline(bundles["fp32"], threads=1)  # auto: a bundle -> onnx
    assert pipe.backend.name == "onnx" and pipe.model_name == json.loads((model_dir / "config.json").read_text())["name"]
    pipe = Pipeline.load(bundles["fp32"], backend="onnx", providers=["CPUExecutionProvider"], threads=1)
    assert pipe.backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(OptionError, match="needs an exported bundle.*fastslm-export"):
        load_pipeline(model_dir, backend="onnx")
    with pytest.raises(OptionError, match="needs a model folder"):
        load_pipeline(bundles["fp32"], backend="torch")
    with pytest.raises(OptionError, match="providers does not apply to the torch backend"):
        load_pipeline(model_dir, backend="torch", providers=["CPUExecutionProvider"])


# ---- fastslm-run on bundles -------------------------------------------------------------------


def test_cli_streams_from_a_bundle(bundles, model_dir, jfk_path):
    args = ["-m", "fastslm.runtime.cli", "--max-new-tokens", "16", str(jfk_path)]
    onnx = run_python(*args[:2], "--model", str(bundles["fp32"]), "--backend", "onnx", "--providers", "CPUExecutionProvider", *args[2:])
    ref = run_python(*args[:2], "--model", str(model_dir), "--backend", "torch", *args[2:])
    assert onnx.returncode == 0 and ref.returncode == 0, onnx.stderr + ref.stderr
    assert "on onnx fp32 (CPUExecutionProvider)" in onnx.stderr
    assert onnx.stdout == ref.stdout and onnx.stdout.strip()
    as_json = run_python(*args[:2], "--model", str(bundles["fp32"]), "--json", *args[2:])
    record = json.loads(as_json.stdout)
    assert record["backend"] == "onnx" and record["text"] == onnx.stdout.strip()


runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(run_app, [*args])


def one_error_line(result, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("fastslm-run: model ")]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("fastslm-run: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def bad_audio(folder: Path, jfk_path: Path, case: str) -> Path:
    path = folder / {"empty file": "empty.wav", "not audio": "notes.wav", "corrupt": "cut.flac",
                     "0 s": "zero.wav", "nan": "nan.wav", "missing": "missing.wav"}[case]  # fmt: skip
    if case == "empty file":
        path.write_bytes(b"")
    elif case == "not audio":
        path.write_text("this is not audio\n")
    elif case == "corrupt":
        path.write_bytes(jfk_path.read_bytes()[:5000])
    elif case == "0 s":
        sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    elif case == "nan":
        sf.write(path, np.full(SAMPLE_RATE, np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    return path


@pytest.mark.parametrize("case", ["empty file", "not audio", "corrupt", "0 s", "nan", "missing"])
def test_cli_bad_audio(case, bundles, tmp_path, jfk_path):
    path = bad_audio(tmp_path, jfk_path, case)
    result = run_cli("--model", str(bundles["fp32"]), str(path))
    line = one_error_line(result, path.name)
    if case == "0 s":
        assert "no samples" in line


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def relist(manifest: dict, bundle: Path, name: str) -> None:
    """Make the manifest vouch for the file as it now is (a careful forger, not a damaged copy)."""
    manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}


def test_cli_bundle_missing_file(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    (bundle / "llm.onnx").unlink()
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "llm.onnx is missing", "re-export")


def test_cli_bundle_altered_file(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    data = bytearray((bundle / "audio_tower.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (bundle / "audio_tower.onnx").write_bytes(bytes(data))
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "audio_tower.onnx was altered", "sha256")


def test_cli_bundle_truncated_file(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    (bundle / "embed_tokens.npy").write_bytes((bundle / "embed_tokens.npy").read_bytes()[:1000])
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "embed_tokens.npy is 1000 bytes")


def test_cli_bundle_without_manifest(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    (bundle / "manifest.json").unlink()
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "no manifest.json")


def test_cli_bundle_from_another_format_version(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    rewrite_manifest(bundle, lambda m: m.update(format_version=2))
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "format version 2", "upgrade fastslm")


def test_cli_bundle_with_config_of_another_model(bundles, tmp_path, jfk_path):
    """config.json swapped for another model's (same name, other sizes), manifest re-hashed."""
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    other = tiny_config(llm_dim=48).to_dict()
    other["name"] = json.loads((bundle / "config.json").read_text())["name"]
    (bundle / "config.json").write_text(json.dumps(other))
    rewrite_manifest(bundle, lambda m: relist(m, bundle, "config.json"))
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "another model")


def test_cli_bundle_with_graph_of_another_bundle(bundles, tmp_path, jfk_path):
    """The fp16 llm.onnx dropped into the fp32 bundle, manifest re-hashed: the graph's I/O give it away."""
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    shutil.copyfile(bundles["fp16"] / "llm.onnx", bundle / "llm.onnx")
    rewrite_manifest(bundle, lambda m: relist(m, bundle, "llm.onnx"))
    one_error_line(run_cli("--model", str(bundle), str(jfk_path)), "llm.onnx", "another bundle")


def test_cli_unknown_provider(bundles, jfk_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    one_error_line(run_cli("--model", str(bundles["fp32"]), "--providers", "cuda", str(jfk_path)), "CUDAExecutionProvider")


def test_cli_error_in_a_real_process_has_no_traceback(bundles, tmp_path, jfk_path):
    bundle = copy_bundle(bundles["fp32"], tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    result = run_python("-m", "fastslm.runtime.cli", "--model", str(bundle), str(jfk_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.json is missing" in lines[0], result.stderr
