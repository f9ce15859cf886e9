"""TensorRT engines without a GPU: profiles, the engine manifest and its checks, real CPU builds.

TensorRT for RTX (`pip install 'fastslm[trt]'`) compiles engines ahead of time on a machine
without a GPU, so these tests really parse and build every graph the tiny model exports (audio
tower and KV-cache decoder, fp32 and fp16, INT8 Q/DQ, INT4 block-quantized weights), and the
shipped demo model's FP16 and INT8 / INT4 engines once it exists. Running
an engine needs a GPU: that is tests/test_trt_gpu.py.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fastslm.export.trt_profiles import (
    DimRange,
    Profile,
    audio_profiles,
    audio_window_bytes,
    default_max_context,
    default_max_windows,
    llm_profile_count,
    llm_profiles,
    plan_profiles,
)
from fastslm.runtime.errors import FastSLMError, ModelFileError, OptionError
from fastslm.runtime.loading import DEFAULT_MODEL_FOLDER
from fastslm.runtime.trt_compat import (
    DeviceFacts,
    EngineMismatchError,
    TrtEnvironment,
    check_engine_manifest,
    import_tensorrt,
    parse_cc,
)

from .conftest import have_tensorrt

HAVE_TRT = have_tensorrt()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (pip install 'fastslm[trt]')")

# The declared I/O of the tiny model's graphs, as the bundle manifest writes them.
N_MELS, Q, H, LAYERS, KV, HD = 80, 5, 64, 2, 2, 16


def audio_inputs() -> list[tuple[str, list]]:
    return [("mel", ["windows", N_MELS, 3000])]


def llm_inputs() -> list[tuple[str, list]]:
    kv = ["batch", KV, "past", HD]
    return [("inputs_embeds", ["batch", "seq", H]), ("position_ids", ["batch", "seq"]), ("logits_index", ["keep"])] + [
        (f"past_key_values.{i}.{kind}", kv) for i in range(LAYERS) for kind in ("key", "value")
    ]


# ---------------------------------------------------------------------------------------------
# Profiles (no TensorRT needed)


def test_audio_profile_is_windows_1_to_n():
    (p,) = audio_profiles(8)
    assert p.name == "windows" and p.dims["windows"] == DimRange(1, 4, 8)
    assert p.shapes(audio_inputs()) == {"mel": ((1, N_MELS, 3000), (4, N_MELS, 3000), (8, N_MELS, 3000))}
    assert audio_profiles(2)[0].dims["windows"] == DimRange(1, 2, 2)


def test_llm_profiles_prefill_then_decode():
    prefill, decode = llm_profiles(max_context=6768, prefill_chunk=1024)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.dims["seq"] == DimRange(1, 256, 1024) and prefill.dims["past"] == DimRange(0, 0, 6767)
    assert decode.dims["seq"] == DimRange(1, 1, 1) and decode.dims["past"] == DimRange(0, 1024, 6767)
    shapes = decode.shapes(llm_inputs())
    assert shapes["past_key_values.1.value"] == ((1, KV, 0, HD), (1, KV, 1024, HD), (1, KV, 6767, HD))
    assert shapes["inputs_embeds"] == ((1, 1, H),) * 3
    assert shapes["logits_index"] == ((1,),) * 3
    assert prefill.shapes(llm_inputs())["position_ids"] == ((1, 1), (1, 256), (1, 1024))


def test_one_llm_profile_is_prefill_serving_single_tokens_too():
    (prefill,) = llm_profiles(max_context=6768, prefill_chunk=1024, one_profile=True)
    assert prefill == llm_profiles(max_context=6768, prefill_chunk=1024)[0]
    assert prefill.dims["seq"].min == 1  # decode's single tokens fit it
    plan = plan_profiles(tokens_per_window=64, window_bytes=1, max_position_embeddings=40960, one_llm_profile=True)
    assert [p.name for p in plan.for_graph("llm")] == ["prefill"]
    assert [p.name for p in plan_profiles(tokens_per_window=64, window_bytes=1, max_position_embeddings=40960)
            .for_graph("llm")] == ["prefill", "decode"]


def test_llm_profile_count_follows_the_hosts_memory():
    published = 8_090_000_000  # the 36-layer decoder's fp16 graph
    count, why = llm_profile_count(published, available_bytes=22 * 10**9)
    assert count == 1 and "about 38.0 GB" in why and "22.0 GB is available" in why and "--trt-two-llm-profiles" in why
    assert llm_profile_count(published, available_bytes=64 * 10**9) == (2, "default")
    assert llm_profile_count(16_000_000, available_bytes=2 * 10**9) == (2, "default")  # the demo model
    assert llm_profile_count(published, available_bytes=None) == (2, "default")
    from fastslm.export.tensorrt_build import available_host_memory

    available = available_host_memory()
    assert available is None or 0 < available < 1 << 50


def test_default_sizes_hold_one_hour_and_fit_memory():
    assert default_max_context(50) == 120 * 50 + 256 + 512 == 6768
    large_v3 = audio_window_bytes(n_ctx=1500, width=1280, n_heads=20)
    assert 200e6 < large_v3 < 300e6
    assert default_max_windows(large_v3, 8 << 30) == 8  # Jetson Orin Nano class
    assert default_max_windows(large_v3, 24 << 30) == 16  # capped
    assert default_max_windows(large_v3, 1 << 30) == 1
    assert default_max_windows(large_v3, None) == 8  # no GPU visible: assume 8 GiB


def test_plan_profiles_records_where_numbers_came_from():
    plan = plan_profiles(tokens_per_window=Q, window_bytes=1 << 20, max_position_embeddings=4096)
    assert (plan.max_windows, plan.max_context, plan.prefill_chunk) == (16, 120 * Q + 768, 1024)
    assert plan.max_windows_source == "assumed 8 GiB device"
    plan = plan_profiles(tokens_per_window=Q, window_bytes=1 << 20, max_position_embeddings=4096, max_windows=3,
                         max_context=100)
    assert (plan.max_windows, plan.max_context, plan.prefill_chunk, plan.max_windows_source) == (3, 100, 100, "option")
    assert [p.name for p in plan.for_graph("llm")] == ["prefill", "decode"]


def test_default_max_context_is_clamped_to_a_small_models_positions():
    """The demo model (150 tokens per window, 8192 positions) cannot hold an hour (18768): the default
    must fit it rather than fail the default trt-fp16 export."""
    plan = plan_profiles(tokens_per_window=150, window_bytes=1 << 20, max_position_embeddings=8192)
    assert plan.max_context == 8192 and plan.prefill_chunk == 1024
    assert plan.max_context_source == "default clamped to the model's 8192 positions (1 h of audio needs 18768)"
    assert plan.for_graph("llm")[1].dims["past"].max == 8191
    roomy = plan_profiles(tokens_per_window=150, window_bytes=1 << 20, max_position_embeddings=40960)
    assert (roomy.max_context, roomy.max_context_source) == (18768, "1 h of audio")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_context": 5000}, "beyond the model's 4096 positions"),
        ({"max_windows": 0}, "--trt-max-windows must be at least 1"),
        ({"max_context": 64, "prefill_chunk": 65}, "--trt-prefill-chunk must be in 1..max context"),
    ],
)
def test_plan_profiles_rejects_bad_options(kwargs, match):
    with pytest.raises(OptionError, match=re.escape(match)):
        plan_profiles(tokens_per_window=Q, window_bytes=1, max_position_embeddings=4096, **kwargs)


def test_profile_needs_every_symbol():
    profile = Profile("p", {"seq": DimRange(1, 1, 4)})
    with pytest.raises(OptionError, match="dim 'past', which profile 'p' does not set"):
        profile.shapes([("x", ["seq", "past"])])
    with pytest.raises(OptionError, match="min <= opt <= max"):
        DimRange(2, 1, 4)


# ---------------------------------------------------------------------------------------------
# The engine manifest check (fake "current" machines, no TensorRT or GPU needed)


def manifest(**device) -> dict:
    rtx = {"aot": True, "specialised_at_load": True, "target_compute_capabilities": "default", "gpu_name": None,
           "compute_capability": None}
    return {"format": "fastslm-trt-engines", "format_version": 1, "target": "trt-fp16",
            "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"}, "device": {**rtx, **device}}


def env(cc: str = "8.9", flavour: str = "tensorrt_rtx", version: str = "1.7.1.116", name: str = "NVIDIA RTX 4090"):
    return TrtEnvironment(flavour, version, DeviceFacts(name, cc, 24 << 30))


def one_line_error(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    assert "fastslm-export --target trt-fp16" in text
    return text


def test_manifest_check_accepts_matching_machines():
    check_engine_manifest(manifest(), env("8.9"))
    check_engine_manifest(manifest(), env("12.0"))
    check_engine_manifest(manifest(target_compute_capabilities=["8.6", "12.0"]), env("8.6"))
    check_engine_manifest(manifest(), TrtEnvironment("tensorrt_rtx", "1.7.1.116", None))  # no GPU: nothing to compare
    jetson = {"aot": False, "target_compute_capabilities": ["8.7"], "gpu_name": "Orin", "compute_capability": "8.7"}
    m = manifest(**jetson) | {"tensorrt": {"flavour": "tensorrt", "version": "10.3.0"}}
    check_engine_manifest(m, env("8.7", "tensorrt", "10.3.0", "Orin"))


@pytest.mark.parametrize(
    "m, e, words",
    [
        (manifest(), env(version="1.8.0.1"), "built with TensorRT for RTX 1.7.1.116, this machine has TensorRT for RTX 1.8.0.1"),
        (manifest(), env(flavour="tensorrt", version="10.3.0"), "this machine has TensorRT 10.3.0"),
        (manifest(target_compute_capabilities=["8.6"]), env("8.9"), "compiled for compute capability 8.6, this NVIDIA RTX 4090 is 8.9"),
        (manifest(), env("7.5", name="RTX 2080"), "--trt-compute-capability 7.5"),
        (manifest(aot=False, gpu_name="Orin", compute_capability="8.7") | {"tensorrt": {"flavour": "tensorrt", "version": "10.3.0"}},
         env("8.9", "tensorrt", "10.3.0"), "built on Orin (compute capability 8.7), this GPU is NVIDIA RTX 4090 (8.9)"),
        ({**manifest(), "format_version": 99}, env(), "engine manifest version 99"),
        ({"format": "x"}, env(), "has no TensorRT engine manifest"),
    ],
)
def test_manifest_check_mismatch_is_one_line_rebuild_error(m, e, words):
    with pytest.raises(EngineMismatchError) as exc_info:
        check_engine_manifest(m, e, where="bundle/")
    assert words in one_line_error(exc_info)
    assert isinstance(exc_info.value, ModelFileError)


def test_same_cc_other_gpu_only_warns():
    m = manifest(aot=False, gpu_name="NVIDIA A10", compute_capability="8.6") | {
        "tensorrt": {"flavour": "tensorrt", "version": "10.3.0"}}
    with pytest.warns(UserWarning, match="may be slower"):
        check_engine_manifest(m, env("8.6", "tensorrt", "10.3.0", "NVIDIA RTX 3090"))


@pytest.mark.parametrize("cc, name", [("9.0", "NVIDIA H200"), ("8.7", "Orin"), ("10.0", "NVIDIA B200")])
def test_rtx_engines_refuse_gpus_its_runtime_does_not_run_on(cc, name):
    """Measured on an H200: TensorRT for RTX 1.7 refuses to deserialize any engine on compute capability 9.0."""
    from fastslm.runtime.trt_compat import rtx_runs_on

    with pytest.raises(EngineMismatchError) as exc_info:
        check_engine_manifest(manifest(), env(cc, name=name), where="bundle/")
    text = str(exc_info.value)
    assert f"TensorRT for RTX does not run on {name} (compute capability {cc}" in text and "full TensorRT" in text
    assert "\n" not in text
    assert not rtx_runs_on(parse_cc(cc))
    assert rtx_runs_on((8, 9)) and rtx_runs_on((12, 1)) and rtx_runs_on((12, 2)) and rtx_runs_on((7, 5))
    # full TensorRT engines built on that GPU are fine
    full = manifest(aot=False, gpu_name=name, compute_capability=cc) | {"tensorrt": {"flavour": "tensorrt", "version": "10.3.0"}}
    check_engine_manifest(full, env(cc, "tensorrt", "10.3.0", name))


def test_rtx_build_for_current_gpu_refuses_an_unsupported_gpu(monkeypatch):
    import fastslm.export.tensorrt_build as tb

    monkeypatch.setattr(tb, "current_device", lambda index=0: DeviceFacts("NVIDIA H200", "9.0", 141 << 30))
    with pytest.raises(OptionError, match="TensorRT for RTX does not run on NVIDIA H200 .*full TensorRT"):
        tb.device_record("tensorrt_rtx", tb.BuildOptions(compute_capabilities=("current",)))
    monkeypatch.setattr(tb, "current_device", lambda index=0: DeviceFacts("NVIDIA RTX 4090", "8.9", 24 << 30))
    record = tb.device_record("tensorrt_rtx", tb.BuildOptions(compute_capabilities=("current",)))
    assert record["target_compute_capabilities"] == ["8.9"] and record["gpu_name"] == "NVIDIA RTX 4090"


def test_compute_capability_spellings():
    assert parse_cc("8.9") == parse_cc("sm89") == parse_cc("89") == (8, 9)
    assert parse_cc("12.0") == parse_cc("SM120") == (12, 0)
    with pytest.raises(OptionError, match="not like '8.9'"):
        parse_cc("ampere")


def test_unknown_flavour_is_an_option_error():
    with pytest.raises(OptionError, match="unknown TensorRT flavour"):
        import_tensorrt("tensorrt_llm")


# ---------------------------------------------------------------------------------------------
# Real builds on the CPU with TensorRT for RTX, from the tiny model's own exports


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory) -> dict[str, Path]:
    """The tiny model's audio tower and decoder exported in fp32 and fp16, with the bundle's I/O."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch import nn
    from torch.export import Dim

    from fastslm.models.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("trt_graphs")
    model = build_tiny_model(folder / "model")
    cfg = model.config
    assert (cfg.n_mels, cfg.tokens_per_window, cfg.qwen3.hidden_size, cfg.qwen3.num_layers) == (N_MELS, Q, H, LAYERS)

    class AudioTower(nn.Module):  # mel fp32 -> speech tokens fp32, the model's dtype inside
        def __init__(self, dtype):
            super().__init__()
            self.audio_tower, self.dtype = model.audio_tower, dtype

        def forward(self, mel):
            return self.audio_tower(mel.to(self.dtype)).float()

    class Decoder(nn.Module):  # inputs_embeds fp32, positions, logits_index, past -> logits fp32, present
        def __init__(self, dtype):
            super().__init__()
            self.llm, self.dtype = model.llm, dtype

        def forward(self, inputs_embeds, position_ids, logits_index, *past):
            logits, keys, values = self.llm.forward_embeds(
                inputs_embeds.to(self.dtype), position_ids, list(past[0::2]), list(past[1::2]))
            out = [logits.index_select(1, logits_index)]
            for k, v in zip(keys, values):
                out += [k, v]
            return tuple(out)

    graphs = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model.to(dtype)
        path = folder / f"audio_tower_{precision}.onnx"
        torch.onnx.export(AudioTower(dtype).eval(), (torch.randn(2, N_MELS, 3000),), str(path), dynamo=True,
                          input_names=["mel"], output_names=["speech_tokens"],
                          dynamic_shapes=({0: Dim("windows", min=1, max=64)},))
        graphs[f"audio_tower_{precision}"] = path

        B, T, P = 2, 3, 4
        past = [torch.randn(B, KV, P, HD, dtype=dtype) for _ in range(2 * LAYERS)]  # distinct tensors: distinct inputs
        args = (torch.randn(B, T, H), torch.arange(P, P + T).expand(B, T), torch.tensor([1, 2]), *past)
        batch, seq, keep = Dim("batch", min=1, max=4), Dim("seq", min=1, max=4096), Dim("keep", min=1, max=4096)
        dyn = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: keep},
               tuple({0: batch, 2: Dim("past", min=0, max=4096)} for _ in past))
        names = [n for n, _ in llm_inputs()]
        outputs = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
        path = folder / f"llm_{precision}.onnx"
        torch.onnx.export(Decoder(dtype).eval(), args, str(path), dynamo=True, input_names=names, output_names=outputs,
                          dynamic_shapes=dyn)
        graphs[f"llm_{precision}"] = path
    model.float()
    return graphs


def build(graph_file: Path, engine: Path, graph: str, precision=("fp16",), one_profile=False, **options):
    from fastslm.export.tensorrt_build import BuildOptions, build_engine

    inputs = audio_inputs() if graph == "audio_tower" else llm_inputs()
    profiles = audio_profiles(4) if graph == "audio_tower" else llm_profiles(64, 16, one_profile)
    options.setdefault("progress", False)
    return build_engine(graph_file, engine, graph=graph, declared_inputs=inputs, profiles=profiles,
                        options=BuildOptions(**options), precision=precision)


def assert_profiles_match_tables(record: dict, profiles: list[Profile], inputs) -> None:
    assert [p["name"] for p in record["profiles"]] == [p.name for p in profiles]
    for got, table in zip(record["profiles"], profiles):
        want = {n: [list(s) for s in rows] for n, rows in table.shapes(inputs).items()}
        assert got["shapes"] == want
        assert got["tensorrt_shapes"] == want  # TensorRT holds exactly the table


@needs_trt
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_audio_tower_engine_builds_on_cpu(tiny_graphs, tmp_path, precision):
    from fastslm.runtime.bundle import sha256_file

    onnx_file = tiny_graphs[f"audio_tower_{precision}"]
    record = build(onnx_file, tmp_path / "audio_tower.engine", "audio_tower", precision=(precision,))
    engine = tmp_path / "audio_tower.engine"
    assert engine.stat().st_size == record["bytes"] > 100_000
    assert record["sha256"] == sha256_file(engine)
    assert record["onnx"]["file"] == onnx_file.name and record["onnx"]["sha256"] == sha256_file(onnx_file)
    assert record["inputs"] == [{"name": "mel", "dtype": "float32", "shape": [-1, N_MELS, 3000]}]
    assert record["outputs"] == [{"name": "speech_tokens", "dtype": "float32", "shape": [-1, Q, H]}]
    assert precision in record["precisions"]
    assert_profiles_match_tables(record, audio_profiles(4), audio_inputs())


@needs_trt
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_llm_engine_builds_with_prefill_and_decode_profiles(tiny_graphs, tmp_path, precision):
    record = build(tiny_graphs[f"llm_{precision}"], tmp_path / "llm.engine", "llm", precision=(precision,))
    dtype = "float16" if precision == "fp16" else "float32"
    inputs = {t["name"]: (t["dtype"], t["shape"]) for t in record["inputs"]}
    outputs = {t["name"]: (t["dtype"], t["shape"]) for t in record["outputs"]}
    assert inputs["inputs_embeds"] == ("float32", [-1, -1, H])
    assert inputs["position_ids"] == ("int64", [-1, -1])
    assert inputs["logits_index"] == ("int64", [-1])
    assert outputs["logits"] == ("float32", [-1, -1, 334])
    for i in range(LAYERS):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"] == (dtype, [-1, KV, -1, HD])
            assert outputs[f"present.{i}.{kind}"] == (dtype, [-1, KV, -1, HD])
    assert_profiles_match_tables(record, llm_profiles(max_context=64, prefill_chunk=16), llm_inputs())
    decode = record["profiles"][1]["tensorrt_shapes"]["past_key_values.0.key"]
    assert decode == [[1, KV, 0, HD], [1, KV, 63, HD], [1, KV, 63, HD]]


@needs_trt
@pytest.mark.slow
def test_llm_engine_with_one_profile_is_streamed_to_its_file(tiny_graphs, tmp_path):
    record = build(tiny_graphs["llm_fp16"], tmp_path / "llm.engine", "llm", one_profile=True)
    assert_profiles_match_tables(record, llm_profiles(64, 16, one_profile=True), llm_inputs())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.engine"]  # no .partial left behind
    assert record["bytes"] == (tmp_path / "llm.engine").stat().st_size > 0
    two = build(tiny_graphs["llm_fp16"], tmp_path / "two.engine", "llm")
    assert len(two["profiles"]) == 2


@needs_trt
@pytest.mark.slow
def test_an_engine_that_cannot_be_written_is_one_line_and_leaves_no_file(tiny_graphs, tmp_path, monkeypatch):
    import fastslm.export.tensorrt_build as tensorrt_build
    from fastslm.export.tensorrt_build import EngineBuildError

    real_open = open
    monkeypatch.setattr(tensorrt_build, "open", lambda path, mode, **kw: real_open("/dev/full", mode, **kw), raising=False)
    with pytest.raises(EngineBuildError, match=r"^could not write the llm engine to .*No space left on device.*free some disk space$"):
        build(tiny_graphs["llm_fp16"], tmp_path / "llm.engine", "llm", one_profile=True)
    assert list(tmp_path.iterdir()) == []


@needs_trt
@pytest.mark.slow
def test_fp16_target_refuses_an_fp32_graph(tiny_graphs, tmp_path):
    with pytest.raises(OptionError, match="the target needs fp16 but audio_tower_fp32.onnx computes in fp32"):
        build(tiny_graphs["audio_tower_fp32"], tmp_path / "a.engine", "audio_tower", precision=("fp16",))
    assert not (tmp_path / "a.engine").exists()


@needs_trt
@pytest.mark.slow
def test_manifest_mismatch_with_the_graph_is_caught(tiny_graphs, tmp_path):
    from fastslm.export.tensorrt_build import BuildOptions, EngineBuildError, build_engine

    with pytest.raises(EngineBuildError, match=r"input mel is shaped \[-1, 80, 3000\] in the ONNX graph but \[.windows., 128, 3000\]"):
        build_engine(tiny_graphs["audio_tower_fp16"], tmp_path / "a.engine", graph="audio_tower",
                     declared_inputs=[("mel", ["windows", 128, 3000])], profiles=audio_profiles(2),
                     options=BuildOptions(progress=False))


@needs_trt
@pytest.mark.slow
def test_builder_options_and_rtx_targets(tiny_graphs, tmp_path):
    from fastslm.export.tensorrt_build import BuildOptions, build_engine, device_record

    _, flavour = import_tensorrt()
    if flavour != "tensorrt_rtx":
        pytest.skip("compute-capability targets are TensorRT for RTX's")
    options = dict(workspace_mib=256, tactic_dram_mib=512, optimization_level=1, compute_capabilities=("8.6", "sm120"),
                   timing_cache=tmp_path / "timing.cache")
    record = build(tiny_graphs["llm_fp16"], tmp_path / "llm.engine", "llm", **options)
    assert record["bytes"] > 0
    assert not (tmp_path / "timing.cache").exists()  # TensorRT for RTX has no timing cache
    device = device_record("tensorrt_rtx", BuildOptions(compute_capabilities=("8.6", "sm120")))
    assert device == {"aot": True, "specialised_at_load": True, "target_compute_capabilities": ["8.6", "12.0"],
                      "gpu_name": None, "compute_capability": None}
    assert device_record("tensorrt_rtx", BuildOptions())["target_compute_capabilities"] == "default"
    with pytest.raises(OptionError, match="cannot target compute capability 9.0; it knows .*8.9"):
        build_engine(tiny_graphs["llm_fp16"], tmp_path / "x.engine", graph="llm", declared_inputs=llm_inputs(),
                     profiles=llm_profiles(64, 16), options=BuildOptions(progress=False, compute_capabilities=("9.0",)))
    with pytest.raises(OptionError, match="--trt-opt-level must be 0..5"):
        BuildOptions(optimization_level=6)


@needs_trt
@pytest.mark.slow
def test_progress_display_follows_tensorrt_phases(tiny_graphs, tmp_path, capsys):
    build(tiny_graphs["audio_tower_fp16"], tmp_path / "a.engine", "audio_tower", progress=True)
    err = capsys.readouterr().err
    assert "TensorRT audio_tower" in err
    assert "done" in err


@needs_trt
def test_unparseable_graph_fails_with_one_line(tmp_path):
    """ONNX Runtime's default static QDQ output: an int32 bias through DequantizeLinear."""
    import onnx
    from onnx import TensorProto, helper

    from fastslm.export.tensorrt_build import BuildOptions, OnnxParseError, build_engine

    bias = helper.make_tensor("bias_q", TensorProto.INT32, [4], [1, 2, 3, 4])
    scale = helper.make_tensor("bias_scale", TensorProto.FLOAT, [], [0.01])
    nodes = [
        helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"], name="proj.bias_DequantizeLinear"),
        helper.make_node("Add", ["x", "bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [bias, scale])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    with pytest.raises(OnnxParseError) as exc_info:
        build_engine(path, tmp_path / "bad.engine", graph="g", declared_inputs=[("x", ["n", 4])],
                     profiles=[Profile("p", {"n": DimRange(1, 1, 2)})], options=BuildOptions(progress=False))
    text = str(exc_info.value)
    assert "\n" not in text and isinstance(exc_info.value, FastSLMError)
    assert text.startswith("TensorRT cannot parse bad.onnx: DequantizeLinear node 'proj.bias_DequantizeLinear'")
    assert "Int32" in text and "re-export" in text
    assert not (tmp_path / "bad.engine").exists()


@needs_trt
@pytest.mark.slow
def test_int8_qdq_and_int4_weight_graphs_build(tiny_graphs, tmp_path):
    """The explicit quantization the calibration work will produce builds as it is."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"mel": np.random.default_rng(i).standard_normal((1, N_MELS, 3000), np.float32)}
                                 for i in range(2)])

        def get_next(self):
            return next(self.batches, None)

    int8 = tmp_path / "audio_tower_int8.onnx"
    quantize_static(str(tiny_graphs["audio_tower_fp32"]), str(int8), Windows(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"], activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True,
                    extra_options={"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True})
    record = build(int8, tmp_path / "audio_tower.engine", "audio_tower", precision=("int8", "int4"))
    assert record["precisions"] == ["fp32", "int8"]

    quantizer = MatMulNBitsQuantizer(onnx.load(tiny_graphs["llm_fp32"]), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",)))
    quantizer.process()
    int4 = tmp_path / "llm_int4.onnx"
    onnx.save(quantizer.model.model, int4)
    record = build(int4, tmp_path / "llm.engine", "llm", precision=("int8", "int4"))
    assert record["precisions"] == ["fp32", "int4"]


@needs_trt
@pytest.mark.slow
def test_engine_manifest_round_trip_and_check(tiny_graphs, tmp_path):
    from fastslm.export.tensorrt_build import BuildOptions, device_record, engine_manifest, write_engine_manifest
    from fastslm.runtime.trt_compat import ENGINE_MANIFEST_FILE, read_engine_manifest

    trt, flavour = import_tensorrt()
    if flavour != "tensorrt_rtx":
        pytest.skip("full TensorRT needs a GPU to build")
    plan = plan_profiles(tokens_per_window=Q, window_bytes=1 << 20, max_position_embeddings=4096, max_windows=4,
                         max_context=64, prefill_chunk=16)
    engines = {"audio_tower": build(tiny_graphs["audio_tower_fp16"], tmp_path / "audio_tower.engine", "audio_tower"),
               "llm": build(tiny_graphs["llm_fp16"], tmp_path / "llm.engine", "llm")}
    options = BuildOptions(progress=False)
    m = engine_manifest("trt-fp16", options, plan, engines, device_record(flavour, options))
    write_engine_manifest(tmp_path, m)
    back = read_engine_manifest(tmp_path)
    assert back == json.loads((tmp_path / ENGINE_MANIFEST_FILE).read_text()) == m
    assert back["tensorrt"] == {"flavour": "tensorrt_rtx", "version": trt.__version__}
    assert back["device"]["aot"] is True and back["device"]["target_compute_capabilities"] == "default"
    assert back["limits"] == {"max_windows": 4, "max_windows_source": "option", "max_context": 64, "prefill_chunk": 16,
                              "llm_profiles": ["prefill", "decode"]}
    assert set(back["engines"]) == {"audio_tower", "llm"}
    check_engine_manifest(back, TrtEnvironment(flavour, trt.__version__, DeviceFacts("RTX 4090", "8.9", 24 << 30)))
    with pytest.raises(EngineMismatchError, match="rebuild the engines on this machine"):
        check_engine_manifest(back, TrtEnvironment(flavour, "0.0.1", None))


@needs_trt
def test_engines_need_a_gpu_to_deserialize():
    """Facts the backend relies on: without a GPU, deserializing fails and the RTX validity check says invalid."""
    from fastslm.runtime.trt_compat import current_device

    if current_device() is not None:
        pytest.skip("a GPU is visible")
    trt, _ = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    assert runtime.deserialize_cuda_engine(b"not an engine") is None


# ---------------------------------------------------------------------------------------------
# The native backend's own logic on the CPU: "device" memory in host RAM, ONNX Runtime running
# the graph at the bound addresses in place of an engine. What stays for a GPU is TensorRT
# itself (tests/test_trt_gpu.py).


class HostDevice:
    """The backend's Device protocol with host memory: every copy is a memmove."""

    stream = 0

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}

    def malloc(self, nbytes):
        block = np.zeros(max(256, nbytes), np.uint8)
        self.blocks[block.ctypes.data] = block
        return block.ctypes.data

    def free(self, ptr):
        del self.blocks[ptr]

    def h2d(self, ptr, host):
        ctypes.memmove(ptr, host.ctypes.data, host.nbytes)

    def d2h(self, host, ptr):
        ctypes.memmove(host.ctypes.data, ptr, host.nbytes)

    def d2d(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def sync(self):
        pass


class OrtRunner:
    """Stands in for EngineRunner: checks the shapes against the profile, runs the ONNX graph on
    the tensors at the bound addresses and writes the outputs to theirs."""

    def __init__(self, path, profiles, declared):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self.dtypes = {t.name: np.dtype(types[t.type]) for t in self.session.get_inputs() + self.session.get_outputs()}
        self.names = set(self.dtypes)
        self.outputs = [t.name for t in self.session.get_outputs()]
        self.tables = [p.shapes(declared) for p in profiles]
        self.runs = []

    def dtype(self, tensor):
        return self.dtypes[tensor]

    def profile_shape(self, tensor, profile):
        return self.tables[profile][tensor]

    def run(self, profile, shapes, addresses):
        feeds = {}
        for name, shape in shapes.items():
            lo, _, hi = self.tables[profile][name]
            assert all(a <= s <= b for a, s, b in zip(lo, shape, hi)), f"{name} {shape} outside profile {profile}"
            dtype = self.dtypes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = (ctypes.c_uint8 * nbytes).from_address(addresses[name]) if nbytes else b""
            feeds[name] = np.frombuffer(bytes(raw), dtype).reshape(shape)
        for name, value in zip(self.outputs, self.session.run(self.outputs, feeds)):
            value = np.ascontiguousarray(value)
            ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
        self.runs.append((profile, shapes[next(iter(shapes))]))


@pytest.fixture()
def host_backend(tiny_graphs):
    from fastslm.runtime.bundle import ModelDims
    from fastslm.runtime.trt_backend import TrtBackend

    device = HostDevice()
    audio = OrtRunner(tiny_graphs["audio_tower_fp32"], audio_profiles(2), audio_inputs())
    llm = OrtRunner(tiny_graphs["llm_fp32"], llm_profiles(max_context=64, prefill_chunk=16), llm_inputs())
    dims = ModelDims("tiny", N_MELS, Q, H, 334, LAYERS, KV, HD, 4096)
    table = np.random.default_rng(0).standard_normal((334, H)).astype(np.float32)
    backend = TrtBackend(device=device, audio=audio, llm=llm, dims=dims, embed_table=table, max_context=64,
                         llm_profiles={"prefill": 0, "decode": 1})
    return backend, device, audio, llm


def reference_logits(session_path, embeds: np.ndarray) -> np.ndarray:
    """Logits of every position of `embeds` in one pass from an empty cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    T = len(embeds)
    feeds = {"inputs_embeds": embeds[None], "position_ids": np.arange(T, dtype=np.int64)[None],
             "logits_index": np.arange(T, dtype=np.int64)}
    for name, _ in llm_inputs()[3:]:
        feeds[name] = np.zeros((1, KV, 0, HD), np.float32)
    return session.run(["logits"], feeds)[0][0]  # (T, V)


@pytest.mark.slow
def test_backend_chunks_prefill_decodes_and_reuses_buffers(host_backend, tiny_graphs):
    backend, device, _, llm = host_backend
    assert (backend.prefill_chunk, backend.max_windows_per_batch, backend.max_context) == (16, 2, 64)
    embeds = np.random.default_rng(1).standard_normal((44, H)).astype(np.float32) * 0.05
    want = reference_logits(tiny_graphs["llm_fp32"], embeds)

    logits, cache = backend.decode(embeds[:40], backend.empty_cache())  # chunks of 16, 16, 8
    assert cache.length == 40 and cache.num_layers == LAYERS
    np.testing.assert_allclose(logits, want[39], atol=1e-4)
    blocks = len(device.blocks)
    for t in range(40, 44):
        logits, cache = backend.decode(embeds[t : t + 1], cache)
        np.testing.assert_allclose(logits, want[t], atol=1e-4)
    assert len(device.blocks) == blocks  # decode steps reuse the pool's buffers, no new allocations
    assert [(p, s[1]) for p, s in llm.runs] == [(0, 16), (0, 16), (0, 8), (1, 1), (1, 1), (1, 1), (1, 1)]

    with pytest.raises(OptionError, match="need 65 positions, the engines hold 64: rebuild them with a larger --trt-max-context"):
        backend.decode(np.zeros((21, H), np.float32), cache)


@pytest.mark.slow
def test_backend_decodes_on_the_prefill_profile_of_a_one_profile_engine(tiny_graphs):
    from fastslm.runtime.bundle import ModelDims
    from fastslm.runtime.trt_backend import TrtBackend

    audio = OrtRunner(tiny_graphs["audio_tower_fp32"], audio_profiles(2), audio_inputs())
    llm = OrtRunner(tiny_graphs["llm_fp32"], llm_profiles(64, 16, one_profile=True), llm_inputs())
    dims = ModelDims("tiny", N_MELS, Q, H, 334, LAYERS, KV, HD, 4096)
    table = np.zeros((334, H), np.float32)
    backend = TrtBackend(device=HostDevice(), audio=audio, llm=llm, dims=dims, embed_table=table, max_context=64,
                         llm_profiles={"prefill": 0})
    embeds = np.random.default_rng(2).standard_normal((20, H)).astype(np.float32) * 0.05
    want = reference_logits(tiny_graphs["llm_fp32"], embeds)
    logits, cache = backend.decode(embeds[:18], backend.empty_cache())
    for t in (18, 19):
        logits, cache = backend.decode(embeds[t : t + 1], cache)
        np.testing.assert_allclose(logits, want[t], atol=1e-4)
    assert [(p, s[1]) for p, s in llm.runs] == [(0, 16), (0, 2), (0, 1), (0, 1)]


@pytest.mark.slow
def test_backend_prefix_cache_copy_and_host_round_trip(host_backend, tiny_graphs, tmp_path):
    from fastslm.runtime.kv_cache import KVCache
    from fastslm.runtime.trt_backend import DeviceTensor

    backend, *_ = host_backend
    rng = np.random.default_rng(2)
    prefix, a, b = (rng.standard_normal((n, H)).astype(np.float32) * 0.05 for n in (20, 3, 5))
    _, cache = backend.decode(prefix, backend.empty_cache())
    assert isinstance(cache.keys[0], DeviceTensor)
    kept = cache.copy()
    logits_a, _ = backend.decode(a, cache)
    logits_b, _ = backend.decode(b, cache)  # the prefix cache is unchanged by the first question
    np.testing.assert_allclose(logits_a, reference_logits(tiny_graphs["llm_fp32"], np.concatenate([prefix, a]))[-1], atol=1e-4)
    np.testing.assert_allclose(logits_b, reference_logits(tiny_graphs["llm_fp32"], np.concatenate([prefix, b]))[-1], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(kept.keys[1]), np.asarray(cache.keys[1]))

    cache.save(tmp_path / "prefix.npz")  # through the host, and back up again
    loaded = KVCache.load(tmp_path / "prefix.npz")
    assert loaded.keys[0].shape == (1, KV, 20, HD)
    logits_c, _ = backend.decode(a, loaded)
    np.testing.assert_allclose(logits_c, logits_a, atol=1e-6)


@pytest.mark.slow
def test_backend_saves_its_runtime_cache_once_kernels_are_built_and_on_close(host_backend):
    """fastslm-run never called close(), so TensorRT for RTX recompiled its kernels on every start: each
    graph's cache is now saved after the first run of each profile, and Pipeline closes its backend."""
    from fastslm.runtime.generate import Pipeline

    backend, device, _, _ = host_backend
    saved = []
    backend._savers = {"audio_tower": lambda: saved.append("audio_tower"), "llm": lambda: saved.append("llm")}
    mel = np.zeros((3, N_MELS, 3000), np.float32)
    backend.encode_windows(mel)  # two engine runs, one profile
    assert saved == ["audio_tower"]
    _, cache = backend.decode(np.zeros((20, H), np.float32), backend.empty_cache())  # prefill profile
    for _ in range(3):
        _, cache = backend.decode(np.zeros((1, H), np.float32), cache)  # decode profile
    backend.encode_windows(mel)
    assert saved == ["audio_tower", "llm", "llm"]
    with Pipeline(backend, tokenizer=None) as pipe:
        assert pipe.backend is backend
    assert saved == ["audio_tower", "llm", "llm", "audio_tower", "llm"]  # closed: both caches saved
    backend.close()  # a second close does nothing
    assert len(saved) == 5


@pytest.mark.slow
def test_backend_encodes_windows_in_engine_sized_batches(host_backend, tiny_graphs):
    import onnxruntime as ort

    backend, _, audio, _ = host_backend
    mel = np.random.default_rng(3).standard_normal((5, N_MELS, 3000)).astype(np.float32) * 0.5
    tokens = backend.encode_windows(mel)
    want = ort.InferenceSession(str(tiny_graphs["audio_tower_fp32"]), providers=["CPUExecutionProvider"]).run(
        None, {"mel": mel})[0]
    assert tokens.shape == (5, Q, H) and tokens.dtype == np.float32
    np.testing.assert_allclose(tokens, want, atol=1e-4)
    assert [s[0] for _, s in audio.runs] == [2, 2, 1]
    np.testing.assert_array_equal(backend.embed_tokens(np.array([3, 7])), backend._embed[[3, 7]])


@needs_trt
@pytest.mark.slow
def test_engines_for_an_exported_bundle(tmp_path):
    """The real exporter's trt-fp16 bundle, rebuilt -> engines.json + both engines, profiles from the model's config;
    an ONNX Runtime bundle's LLM graph (ONNX Runtime's attention op) is refused in one line."""
    bundle_writer = pytest.importorskip("fastslm.export.bundle_writer")
    from fastslm.export.tensorrt_build import BuildOptions, build_bundle_engines
    from fastslm.models.tiny import build_tiny_model
    from fastslm.runtime.trt_compat import read_engine_manifest

    build_tiny_model(tmp_path / "model")
    bundle = tmp_path / "bundle"
    ort_bundle = tmp_path / "ort-bundle"
    bundle_writer.export_bundle(bundle_writer.ExportOptions(model=tmp_path / "model", out=ort_bundle, target="onnx-fp16",
                                                            decoder_cache="in-place", progress=False))
    from fastslm.export.tensorrt_build import OnnxParseError

    with pytest.raises(OnnxParseError, match="ONNX Runtime graph .*--target trt-fp16"):
        build_bundle_engines(ort_bundle, "trt-fp16", BuildOptions(progress=False))
    bundle_writer.export_bundle(bundle_writer.ExportOptions(model=tmp_path / "model", out=bundle, target="trt-fp16",
                                                            progress=False))
    m = build_bundle_engines(bundle, "trt-fp16", BuildOptions(progress=False), max_windows=3, prefill_chunk=32)
    assert read_engine_manifest(bundle) == m
    assert m["limits"] == {"max_windows": 3, "max_windows_source": "option", "max_context": 120 * Q + 768,
                           "prefill_chunk": 32, "llm_profiles": ["prefill", "decode"]}
    declared = {g["file"]: g for g in json.loads((bundle / "manifest.json").read_text())["graphs"].values()}
    for graph, table in (("audio_tower", audio_profiles(3)), ("llm", llm_profiles(120 * Q + 768, 32))):
        engine = m["engines"][graph]
        assert (bundle / engine["file"]).stat().st_size == engine["bytes"]
        assert engine["precisions"] == ["fp16"]
        inputs = [(t["name"], t["shape"]) for t in declared[engine["onnx"]["file"]]["inputs"]]
        assert_profiles_match_tables(engine, table, inputs)


# ---------------------------------------------------------------------------------------------
# The shipped demo model: every graph and precision its exports produce, built on the CPU


@needs_trt
@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL_FOLDER.is_dir(), reason="the demo model is not shipped yet (models/demo/shipped/model)")
@pytest.mark.parametrize("target, llm_bits", [("trt-fp16", None), ("trt-int8", 4)])
def test_demo_model_engines_build_on_cpu(target, llm_bits, tmp_path):
    """FP16 engines, and INT8 Q/DQ audio tower + INT4 LLM weights (the INT8 LLM build is the tiny
    model's test), calibrated on the default audio. No WER gate here, to keep CI short: the
    accuracy gates on the demo model are tests/test_calibration_export.py's. (Calibrated on
    jfk.flac alone, the INT8 audio tower's ranges are too narrow for the exporter's random-input check:
    cosine 0.965 against its 0.98.)"""
    from typer.testing import CliRunner

    from fastslm.export.cli import app

    out = tmp_path / target
    args = ["--model", str(DEFAULT_MODEL_FOLDER), "--out", str(out), "--target", target,
            "--trt-max-windows", "2", "--trt-max-context", "1024", "--trt-prefill-chunk", "256"]
    if llm_bits:
        # --override-gates: this test is about the engines; 2 gate windows (36 positions) make the INT4
        # top-1 gate a coin toss (83.3% against 85% with the calib-split windows), and the demo model's
        # gates are tests/test_calibration_export.py's
        args += ["--llm-bits", str(llm_bits), "--sensitivity-windows", "4", "--gate-windows", "2", "--wer-items", "0",
                 "--override-gates"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-2000:]
    engines = json.loads((out / "engines.json").read_text())["engines"]
    config = json.loads((DEFAULT_MODEL_FOLDER / "config.json").read_text())
    want_audio = ["fp16", "int8"] if llm_bits else ["fp16"]
    assert engines["audio_tower"]["precisions"] == want_audio
    assert engines["llm"]["precisions"] == (["fp16", f"int{llm_bits}"] if llm_bits else ["fp16"])
    declared = {g["file"]: g for g in json.loads((out / "manifest.json").read_text())["graphs"].values()}
    audio = declared[engines["audio_tower"]["onnx"]["file"]]
    assert audio["outputs"][0]["shape"] == ["windows", config["hfq_former"]["n_queries"], config["qwen3"]["hidden_size"]]
    for graph in ("audio_tower", "llm"):
        assert (out / engines[graph]["file"]).stat().st_size == engines[graph]["bytes"] > 0
