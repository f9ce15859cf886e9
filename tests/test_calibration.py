"""Calibration building blocks without a model: Q/DQ rewriting, range methods, calibration data, gates.

The exports of the tiny model through these pieces (and their gates) are test_calibration_export.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
from onnx import TensorProto, helper, numpy_helper

from fastslm.calibration.data import (
    CALIBRATION_FILE, WINDOWS_FILE, CalibrationError, CalibrationSet, collect, find_audio, spread,
)
from fastslm.calibration.evaluation import EvalItem
from fastslm.calibration.gates import (
    GateError, GateReport, GateRow, GateThresholds, run_gates, top1_agreement, wer_rows,
)
from fastslm.calibration.qdq import (
    BLOCK_OPSET, INT8_MAX, INT16_MAX, find_layers, insert_int8_qdq, insert_weight_only, integer_kernels, pack_int4,
    quantize_blocks, quantize_per_channel, saturating_layers, worst_u8s8_pair_sum,
)
from fastslm.calibration.ranges import HIST_BINS, AbsHistogram, Ranges, entropy_threshold
from fastslm.runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from fastslm.runtime.kv_cache import KVCache

RNG = np.random.default_rng(0)


def scope(node: onnx.NodeProto, module: str) -> onnx.NodeProto:
    """The name-scope metadata torch.onnx writes: [..., module path, op name]."""
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(["", module, node.name])
    return node


def small_graph(dtype=np.float32) -> onnx.ModelProto:
    """x (n, 3, 16) -> Conv(bias) -> LN-ish -> q/k projections -> scores -> Softmax -> @ v -> out proj -> Gemm."""

    def f(*shape: int) -> np.ndarray:  # fan-in scaled
        return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 4)).astype(dtype)

    onnx_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(a, n) for n, a in {
        "conv_w": f(8, 3, 3), "conv_b": f(8), "wq": f(16, 16), "wk": f(16, 16), "wv": f(16, 16), "wo": f(16, 16),
        "gemm_w": f(4, 16), "gemm_b": f(4),
    }.items()] + [numpy_helper.from_array(np.array([1], np.int64), "pool_axes")]  # fmt: skip
    nodes = [
        scope(helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1]), "net.conv"),
        helper.make_node("Transpose", ["c"], ["ct"], name="t", perm=[0, 2, 1]),  # (n, 16, 8) ... (n, T=16, C=8)
        helper.make_node("Transpose", ["ct"], ["h"], name="t2", perm=[0, 2, 1]),  # (n, 8, 16): 8 tokens of width 16
        scope(helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"), "net.attn.q"),
        scope(helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"), "net.attn.k"),
        scope(helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"), "net.attn.v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        scope(helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"), "net.attn"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        scope(helper.make_node("MatMul", ["p", "v"], ["a"], name="mix"), "net.attn"),
        scope(helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"), "net.attn.out"),
        helper.make_node("ReduceMean", ["o", "pool_axes"], ["m"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["m", "gemm_w", "gemm_b"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx_type, ["n", 3, 16])],
                              [helper.make_tensor_value_info("y", onnx_type, ["n", 4])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if x.dtype == np.float16:  # fp16 graphs crash onnxruntime 1.32 at ORT_ENABLE_ALL on the CPU
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# ---------------------------------------------------------------------------------------------
# Q/DQ rewriting


def test_layers_are_weight_gemms_named_by_module():
    layers = find_layers(small_graph())
    assert [(l.key, l.op, l.channel_axis) for l in layers] == [
        ("net.conv", "Conv", 0), ("net.attn.q", "MatMul", 1), ("net.attn.k", "MatMul", 1), ("net.attn.v", "MatMul", 1),
        ("net.attn.out", "MatMul", 1), ("head", "Gemm", 0),  # no name scope: the node name
    ]  # fmt: skip
    # Attention scores and probabilities x values are activation x activation: never layers.
    assert not {"scores", "mix"} & {l.node for l in layers}


def test_int8_qdq_follows_tensorrt_rules_and_stays_accurate():
    model = small_graph()
    x = RNG.standard_normal((2, 3, 16)).astype(np.float32)
    amax = {l.key: 4.0 for l in find_layers(model)}
    quantized, keys = insert_int8_qdq(clone(model), amax, keep_float={"net.attn.out"})
    onnx.checker.check_model(quantized, full_check=True)
    assert "net.attn.out" not in keys and len(keys) == 5
    nodes = {n.name: n for n in quantized.graph.node}
    produced = {o: n for n in quantized.graph.node for o in n.output}
    inits = {i.name: i for i in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            # Symmetric: zero points are int8 zeros (or absent); nothing is quantized to int32 (biases stay float).
            if len(node.input) == 3:
                zp = numpy_helper.to_array(inits[node.input[2]])
                assert zp.dtype == np.int8 and not zp.any()
            if node.input[0] in inits:
                assert inits[node.input[0]].data_type == TensorProto.INT8
        if node.op_type == "QuantizeLinear":
            assert node.input[0] == "x" or produced[node.input[0]].op_type != "Softmax"  # Softmax outputs: never
    assert nodes["conv"].input[2] == "conv_b" and nodes["head"].input[2] == "gemm_b"  # float biases
    for name in ("conv", "q_proj", "k_proj", "v_proj", "head"):
        assert [produced[i].op_type for i in nodes[name].input[:2]] == ["DequantizeLinear"] * 2
    assert nodes["o_proj"].input[1] == "wo"  # kept float
    assert nodes["mix"].input == ["p", "v"] and nodes["scores"].input == ["q", "kt"]
    # q, k and v read one tensor: each gets its own Q/DQ pair (ONNX Runtime fuses single-consumer pairs only).
    dq_inputs = [nodes[n].input[0] for n in ("q_proj", "k_proj", "v_proj")]
    assert len(set(dq_inputs)) == 3
    # Per output channel weight scales: Gemm transB=1 keeps channels on axis 0.
    head_dq = produced[nodes["head"].input[1]]
    assert [a.i for a in head_dq.attribute if a.name == "axis"] == [0]
    assert numpy_helper.to_array(inits[head_dq.input[1]]).shape == (4,)
    assert cosine(run(quantized, x), run(model, x)) > 0.999


def vpmaddubsw_gemm(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """(M, K) uint8 x (K, N) int8 as ONNX Runtime's U8S8 kernels compute it on x86 CPUs without VNNI:
    two neighbouring products along K go into a saturating int16 (vpmaddubsw), then int32."""
    a, w = a_u8.astype(np.int32), w_s8.astype(np.int32)
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]  # (M, K/2, N)
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1)


def u8u8_gemm(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """The same product through the U8U8 kernels: weights shifted to uint8 (zero point 128), both sides
    widened to int16, pairs summed into int32 (vpmaddwd), then the zero point taken back out."""
    a, w_u8 = a_u8.astype(np.int64), w_s8.astype(np.int64) + 128
    pairs = a[:, 0::2, None] * w_u8[None, 0::2, :] + a[:, 1::2, None] * w_u8[None, 1::2, :]
    assert pairs.max() <= np.iinfo(np.int32).max  # 2 * 255 * 255: the int32 pair never overflows
    return pairs.sum(axis=1) - 128 * a.sum(axis=1, keepdims=True)


def test_full_range_int8_weights_saturate_u8s8_and_not_u8u8():
    """Why fastslm's sessions ask for U8U8: full-range weights saturate the U8S8 kernel of CPUs
    without VNNI, and the U8U8 kernel gives the exact int32 GEMM for the same integers."""
    w = numpy_helper.to_array(next(i for i in small_graph().graph.initializer if i.name == "wq"))  # (K, N)
    q, _ = quantize_per_channel(w, axis=1)
    assert np.abs(q).max() == INT8_MAX
    loud = np.full((1, w.shape[0]), 255, np.uint8)  # every activation at the top of its range
    speech = np.random.default_rng(1).integers(0, 256, size=(64, w.shape[0])).astype(np.uint8)  # own stream: the later tests draw from RNG
    assert not np.array_equal(vpmaddubsw_gemm(loud, q), loud.astype(np.int32) @ q.astype(np.int32))
    for a in (loud, speech):
        np.testing.assert_array_equal(u8u8_gemm(a, q), a.astype(np.int64) @ q.astype(np.int64))


def test_no_int8_kernel_can_saturate_in_fastslm_sessions(as_ort_runs_it):
    """Whatever CPU runs this: in the graph ONNX Runtime runs for fastslm's session options, no
    integer kernel multiplies by int8 weights beyond +-64 (they became uint8 for U8U8 kernels), while
    with ONNX Runtime's default options the same graph keeps saturating ones."""
    model = small_graph()
    quantized, keys = insert_int8_qdq(clone(model), {l.key: 4.0 for l in find_layers(model)})
    assert max(worst_u8s8_pair_sum(quantized).values()) == 255 * 2 * INT8_MAX > INT16_MAX  # as written
    ours, default = as_ort_runs_it(quantized), as_ort_runs_it(quantized, fastslm_options=False)
    assert integer_kernels(ours) == integer_kernels(default) > 0
    assert saturating_layers(ours) == {}
    assert len(saturating_layers(default)) == integer_kernels(default)
    x = np.random.default_rng(2).standard_normal((2, 3, 16)).astype(np.float32)
    assert cosine(run(quantized, x), run(model, x)) > 0.999


def test_int8_qdq_in_an_fp16_graph_uses_fp16_scales():
    model = small_graph(np.float16)
    quantized, keys = insert_int8_qdq(clone(model), {l.key: 4.0 for l in find_layers(model)})
    scales = [i for i in quantized.graph.initializer if i.name.endswith("_scale")]
    assert scales and {s.data_type for s in scales} == {TensorProto.FLOAT16}
    x = RNG.standard_normal((2, 3, 16)).astype(np.float16)
    assert cosine(run(quantized, x), run(model, x)) > 0.995


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_dequantizes_weights_and_onnxruntime_fuses_them(bits, tmp_path):
    model = small_graph()
    # 256 inputs of its own: on two, INT4's cosine ranged 0.976-0.999 over seeds; on 256 it is 0.990.
    x = np.random.default_rng(99).standard_normal((256, 3, 16)).astype(np.float32)
    quantized, keys = insert_weight_only(clone(model), bits, block_size=16)
    assert keys == ["net.attn.q", "net.attn.k", "net.attn.v", "net.attn.out", "head"]  # Conv stays float
    onnx.checker.check_model(quantized, full_check=True)
    dqs = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in quantized.graph.initializer}
    assert len(dqs) == 5 and not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)  # float activations
    attrs = {a.name: a.i for a in dqs[0].attribute}
    if bits == 8:
        assert inits[dqs[0].input[0]].data_type == TensorProto.INT8 and attrs == {"axis": 1}
        assert quantized.opset_import[0].version == 20
    else:
        assert inits[dqs[0].input[0]].data_type == TensorProto.INT4 and attrs == {"axis": 0, "block_size": 16}
        assert quantized.opset_import[0].version == BLOCK_OPSET
    assert cosine(run(quantized, x), run(model, x)) > (0.999 if bits == 8 else 0.98)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 4  # the MatMuls; the Gemm dequantizes once
    kept, keys = insert_weight_only(clone(model), bits, block_size=16, keep_float={"head"})
    assert "head" not in keys and next(n for n in kept.graph.node if n.name == "head").input[1] == "gemm_w"


def test_int4_packing_and_blocks_match_onnx():
    values = RNG.integers(-8, 8, size=(37, 5)).astype(np.int8)  # an odd count: the last byte is half used
    tensor = helper.make_tensor("w", TensorProto.INT4, values.shape, pack_int4(values), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), values)
    w = RNG.standard_normal((40, 3)).astype(np.float32)  # 40 rows: blocks of 16, 16 and a partial 8
    q, scale = quantize_blocks(w, 16)
    assert q.shape == (40, 3) and scale.shape == (3, 3) and q.min() >= -8 and q.max() <= 7
    back = q.astype(np.float32) * np.repeat(scale, 16, axis=0)[:40]
    assert np.abs(back - w).max() <= scale.max() / 2 + 1e-6
    q8, s8 = quantize_per_channel(w, axis=1)
    assert s8.shape == (3,) and np.abs(q8).max() == 127


# ---------------------------------------------------------------------------------------------
# Range methods


def test_range_methods_on_a_known_distribution():
    h = AbsHistogram()
    x = RNG.standard_normal(400_000).astype(np.float32)
    x[:10] = 40.0  # ten outliers
    for part in np.array_split(x, 4):
        h.add(part)
    h.add(np.zeros(1_000_000, np.float32))  # padding: ignored
    assert h.counts.sum() == len(x) and h.amax == pytest.approx(40.0)
    assert h.threshold("minmax") == pytest.approx(40.0)
    p = h.threshold("percentile", 99.9)
    assert 3.1 < p < 3.5  # |N(0,1)| 99.9 % = 3.29, within a bin (40 / 2048 ~ 0.02)
    e = h.threshold("entropy")
    assert 2.0 < e < 10.0  # clips the outliers, keeps the bulk
    with pytest.raises(CalibrationError, match="unknown range method 'max'"):
        h.threshold("max")


def test_histogram_widens_without_losing_counts():
    h = AbsHistogram()
    h.add(np.array([0.5, 1.0], np.float32))
    width = h.width
    h.add(np.array([100.0], np.float32))
    assert h.width >= 100.0 / HIST_BINS and h.width / width == 2 ** round(np.log2(h.width / width))
    assert h.counts.sum() == 3 and h.amax == 100.0


def test_entropy_threshold_prefers_the_bulk():
    counts = (1e6 * np.exp(-np.arange(HIST_BINS) / 40.0)).astype(np.int64)  # a Laplacian bulk (scale 40 bins)
    counts[2000] = 1  # one outlier far out
    assert 150 <= entropy_threshold(counts) <= 800
    flat = np.zeros(HIST_BINS, np.int64)
    flat[:100] = 5
    assert entropy_threshold(flat) == 100  # nothing to clip: the top of the data


def test_ranges_round_trip(tmp_path):
    h = AbsHistogram()
    h.add(RNG.standard_normal(10_000).astype(np.float32))
    ranges = Ranges("f" * 64, "w" * 64, 99.9, {"a": h, "b": h})
    ranges.save(tmp_path / "ranges.json")
    back = Ranges.load(tmp_path / "ranges.json")
    assert back.fingerprint == ranges.fingerprint and back.amax("percentile") == ranges.amax("percentile")
    (tmp_path / "bad.json").write_text("{")
    assert Ranges.load(tmp_path / "bad.json") is None and Ranges.load(tmp_path / "missing.json") is None


def test_ranges_of_the_old_layer_names_are_refused_in_one_line(tmp_path):
    """Format 1 keyed layers `tower.whisper.*` / `tower.adapter.*` (and hashed those keys into its
    fingerprint): such a file is refused with a line that says how to measure the ranges again."""
    hist = {"width": 0.01, "amax": 3.0, "counts": [0] * HIST_BINS}
    version_1 = {"format": "fastslm-ranges", "format_version": 1, "fingerprint": "f" * 64, "windows_sha256": "w" * 64,
                 "percentile": 99.99, "methods": {"minmax": {"tower.whisper.conv1": 3.0, "tower.adapter.llm_proj": 3.0}},
                 "histograms": {"tower.whisper.conv1": hist, "tower.adapter.llm_proj": hist}}  # fmt: skip
    (tmp_path / "ranges.json").write_text(json.dumps(version_1))
    with pytest.raises(CalibrationError, match=r"ranges format 1, .* re-run fastslm-calibrate --model MODEL --out ") as err:
        Ranges.load(tmp_path / "ranges.json")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    from fastslm.calibration.build import QuantOptions

    with pytest.raises(CalibrationError, match="ranges format 1"):
        QuantOptions(calibration=tmp_path)  # an export refuses the folder before any work
    (tmp_path / "ranges.json").write_text("[]")  # not a record at all: none, as a damaged file
    assert Ranges.load(tmp_path / "ranges.json") is None


@pytest.mark.parametrize("through_file", [False, True])
def test_ranges_leave_the_graph_as_it_was(through_file, monkeypatch):
    """Beyond protobuf's 2 GB the probe goes through a file (forced here): the graph keeps its weights and outputs."""
    from fastslm.calibration import ranges as ranges_module

    if through_file:
        monkeypatch.setattr(ranges_module, "INLINE_GRAPH_LIMIT", 0)
    model = small_graph()
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    outputs = [o.name for o in model.graph.output]
    x = RNG.standard_normal((3, 3, 16)).astype(np.float32)
    got = ranges_module.collect_ranges(model, x, input_name="x")
    assert [o.name for o in model.graph.output] == outputs
    assert all(t.data_location != TensorProto.EXTERNAL and not t.external_data for t in model.graph.initializer)
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert got.amax("minmax")["net.conv"] == pytest.approx(float(np.abs(x).max()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Calibration data


def test_windows_are_cut_as_at_run_time(jfk_path, tmp_path):
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    data = collect([jfk_path, quiet], 80, progress=False, model={"name": "m"})
    np.testing.assert_array_equal(data.windows, audio_to_windows(load_audio(jfk_path), 80))
    assert [s["path"] for s in data.sources] == [str(jfk_path)]
    assert data.skipped[0]["path"] == str(quiet) and "silent" in data.skipped[0]["reason"]
    data.save(tmp_path / "calib")
    back = CalibrationSet.load(tmp_path / "calib")
    np.testing.assert_array_equal(back.windows, data.windows)
    assert json.loads((tmp_path / "calib" / CALIBRATION_FILE).read_text())["sha256"] == data.sha256


def test_max_windows_spreads_over_recordings(jfk_path, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    jfk = load_audio(jfk_path)
    for i in range(6):
        sf.write(folder / f"{i}.wav", jfk * (0.2 + 0.1 * i), SAMPLE_RATE)
    data = collect([folder], 80, max_windows=3, progress=False)
    assert len(data.windows) == 3 and [Path(s["path"]).name for s in data.sources] == ["0.wav", "2.wav", "5.wav"]
    assert spread(10, 4) == [0, 3, 6, 9] and spread(3, 5) == [0, 1, 2]


@pytest.mark.parametrize("case, match", [
    ("missing", "calibration audio .*missing.wav does not exist"),
    ("empty folder", "holds no audio files"),
    ("silence", r"all 2 calibration recording\(s\) are silent"),
    ("nothing", "no calibration audio was given"),
])  # fmt: skip
def test_bad_calibration_audio_is_one_clear_error(case, match, tmp_path):
    paths = {"missing": [tmp_path / "missing.wav"], "empty folder": [tmp_path], "nothing": []}.get(case)
    if case == "silence":
        for name in ("a.wav", "b.flac"):
            sf.write(tmp_path / name, RNG.standard_normal(SAMPLE_RATE).astype(np.float32) * 1e-4, SAMPLE_RATE)
        paths = [tmp_path]
    with pytest.raises(CalibrationError, match=match) as info:
        collect(paths, 80, progress=False)
    assert "\n" not in str(info.value)


def test_calibration_folder_checks(jfk_path, tmp_path):
    with pytest.raises(CalibrationError, match="is not a calibration folder"):
        CalibrationSet.load(tmp_path)
    data = collect([jfk_path], 80, progress=False, model={"name": "tiny"})
    data.save(tmp_path / "c")
    with pytest.raises(CalibrationError, match=r"holds 80-bin mel windows \(collected for 'tiny'\), this model takes 128"):
        data.check_model(128, "big", "c")
    np.save(tmp_path / "c" / WINDOWS_FILE, data.windows * 2)
    with pytest.raises(CalibrationError, match="was altered"):
        CalibrationSet.load(tmp_path / "c")
    assert find_audio([jfk_path, jfk_path]) == [jfk_path]


# ---------------------------------------------------------------------------------------------
# Gates


def test_gate_table_and_override():
    report = GateReport("gates: x", [
        GateRow("speech-token cosine (4 windows)", "0.99900 (min 0.99800)", ">= 0.99", True, 0.999),
        GateRow("LLM top-1 agreement", "80.0% of 10 positions", ">= 85%", False, 0.8),
        GateRow("WER", "", "<= +2 pt", None, note="skipped: no eval audio"),
    ])  # fmt: skip
    table = report.table()
    assert table.splitlines()[0] == "gates: x"
    assert re.search(r"LLM top-1 agreement +80.0% of 10 positions +>= 85% +FAIL", table)
    assert re.search(r"WER +skipped: no eval audio +<= \+2 pt +skipped", table)
    with pytest.raises(GateError, match=r"LLM top-1 agreement: 80.0% of 10 positions \(limit >= 85%\); nothing was "
                                        r"written \(pass --override-gates"):  # fmt: skip
        report.enforce(override=False)
    report.enforce(override=True)
    assert report.to_dict()["passed"] is False


class FakeTokenizer:
    eos_ids = (0,)

    def encode_prompt(self, text):
        from fastslm.runtime.prompt import PromptIds

        return PromptIds(left=(1, 2), right=(3,))


class FakeBackend:
    """Speech tokens = mean of the mel times a constant; the LLM predicts (last id + shift) mod V."""

    name, n_mels, tokens_per_window, hidden_size, max_windows_per_batch, max_context = "fake", 4, 2, 3, 1, 100

    def __init__(self, noise=0.0, shift=1, vocab=7):
        self.noise, self.shift, self.vocab = noise, shift, vocab

    def encode_windows(self, mel):
        base = mel.mean(axis=(1, 2))[:, None, None] * np.ones((1, 2, 3)) + np.arange(6).reshape(1, 2, 3)
        return (base + self.noise * np.cos(np.arange(6)).reshape(1, 2, 3)).astype(np.float32)

    def embed_tokens(self, ids):
        return np.stack([np.full(3, float(i), np.float32) for i in ids])

    def empty_cache(self):
        return KVCache()

    def decode(self, embeds, cache):
        last = int(round(embeds[-1, 0])) if embeds[-1, 0] == embeds[-1, 1] else 4
        logits = np.zeros(self.vocab, np.float32)
        logits[(last + self.shift) % self.vocab] = 1.0
        return logits, cache


def test_top1_agreement_counts_teacher_forced_positions():
    ref, same, other = FakeBackend(), FakeBackend(), FakeBackend(shift=2)
    speech = [np.zeros((2, 3), np.float32)]
    # The reference walks 3 -> 4 -> 5 -> 6 -> 0 (an end token): 4 positions, the last one the end.
    assert top1_agreement(ref, same, FakeTokenizer(), speech, max_tokens=10) == (4, 4)
    assert top1_agreement(ref, other, FakeTokenizer(), speech, max_tokens=10) == (0, 4)
    assert top1_agreement(ref, same, FakeTokenizer(), speech, max_tokens=2) == (2, 2)


def test_cosine_and_top1_gates_on_fake_backends():
    windows = RNG.standard_normal((3, 4, 8)).astype(np.float32)
    kwargs = dict(title="t", windows=windows, audio_quantized=True, llm_bits=4)
    ok = run_gates(FakeBackend(), FakeBackend(noise=0.01), FakeTokenizer(), **kwargs)
    assert [r.passed for r in ok.rows] == [True, True, None, None, None]
    assert "no eval audio" in ok.rows[2].note  # no name check: a test model is not special-cased
    bad = run_gates(FakeBackend(), FakeBackend(noise=30.0, shift=3), FakeTokenizer(), **kwargs)
    assert [r.passed for r in bad.rows[:2]] == [False, False]


@pytest.mark.parametrize("hyps, expect", [
    # FP32 transcripts, then per (audio, LLM): the WER gate's three rows
    ({"ref": ["a b c d", "e f g h"], "audio": ["a b c d", "e f g h"], "llm": ["a b c x", "e f g h"],
      "both": ["a b c x", "e f g h"]}, [True, False, False]),
    ({"ref": ["x y z w", "e f g h"]}, None),  # FP32 WER 50 %... still transcribes
    ({"ref": ["x y z w", "x f g x"]}, "skipped"),  # FP32 WER 75 %: no WER gate
])  # fmt: skip
def test_wer_gate_with_a_fake_transcriber(hyps, expect):
    pytest.importorskip("jiwer")
    pytest.importorskip("whisper_normalizer")
    ref, cand = FakeBackend(), FakeBackend(noise=1.0)
    items = [EvalItem("u1", "a b c d", Path("u1.wav")), EvalItem("u2", "e f g h", Path("u2.wav"))]

    def transcribe(audio, llm, got_items):
        assert got_items == items
        key = {(ref, ref): "ref", (cand, ref): "audio", (ref, cand): "llm", (cand, cand): "both"}[(audio, llm)]
        return hyps.get(key, hyps["ref"])

    t = GateThresholds(wer_audio_int8=0.5, wer_llm_int4=2.0)
    rows = wer_rows(ref, cand, True, 4, t, items, "", transcribe)
    assert [r.gate.split(" (")[0] for r in rows] == [
        "WER, INT8 audio tower + FP32 LLM", "WER, FP32 audio tower + INT4 LLM", "WER, whole bundle"]
    if expect == "skipped":
        assert all(r.passed is None and "FP32 WER 75.0%" in r.note for r in rows)
    elif expect is None:
        assert all(r.passed for r in rows)  # identical transcripts: +0 pt
    else:
        assert [r.passed for r in rows] == expect
        assert rows[1].value == pytest.approx(12.5) and rows[1].limit == "<= +2 pt" and rows[2].limit == "<= +2.5 pt"
    no_items = wer_rows(ref, cand, True, 4, t, [], "no eval audio (x missing)", transcribe)
    assert all(r.passed is None and r.note == "skipped: no eval audio (x missing)" for r in no_items)


def test_wer_gate_transcribes_the_reference_once_across_rounds():
    """The exporter gates again after keeping more layers float: the FP32 transcripts do not change."""
    pytest.importorskip("jiwer")
    pytest.importorskip("whisper_normalizer")
    ref, cand = FakeBackend(), FakeBackend(noise=1.0)
    items = [EvalItem(f"u{i}", "a b c d", Path(f"u{i}.wav")) for i in range(8)]
    calls = []

    def transcribe(audio, llm, got_items):
        calls.append((audio is ref and llm is ref, [it.id for it in got_items]))
        return ["a b c d"] * len(got_items)

    known: dict[str, str] = {}
    first = wer_rows(ref, cand, True, 4, GateThresholds(), items, "", transcribe, fp32_transcripts=known)
    assert [c for c in calls if c[0]] == [(True, [f"u{i}" for i in range(5)]), (True, ["u5", "u6", "u7"])]
    assert known == {f"u{i}": "a b c d" for i in range(8)}
    calls.clear()
    again = wer_rows(ref, cand, True, 4, GateThresholds(), items, "", transcribe, fp32_transcripts=known)
    assert [c for c in calls if c[0]] == [] and len(calls) == 3  # only the three candidate rows
    assert [r.value for r in again] == [r.value for r in first] == [0.0, 0.0, 0.0]


def test_wer_gate_gives_up_early_on_a_model_that_does_not_transcribe():
    pytest.importorskip("jiwer")
    pytest.importorskip("whisper_normalizer")
    items = [EvalItem(f"u{i}", "a b c d", Path(f"u{i}.wav")) for i in range(8)]
    calls = []

    def transcribe(audio, llm, got_items):
        calls.append(len(got_items))
        return ["x"] * len(got_items)

    rows = wer_rows(FakeBackend(), FakeBackend(), False, 8, GateThresholds(), items, "", transcribe)
    assert calls == [5] and len(rows) == 1
    assert rows[0].passed is None and rows[0].note.startswith("skipped: FP32 WER 100% on the first 5 utterances")


def test_a_corpus_gate_split_replaces_eval_seen_and_jfk_in_the_wer_gate(jfk_path, tmp_path):
    """A gate split keeps the WER gate off the sets a model's results are reported on."""
    from fastslm.calibration.gates import eval_items

    def split(name: str, n: int) -> None:
        (tmp_path / "audio" / name).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            rel = f"audio/{name}/{name}-{i:06d}.flac"
            sf.write(tmp_path / rel, np.zeros(1600, np.float32), SAMPLE_RATE)
            lines.append(json.dumps({"id": f"{name}-{i:06d}", "text": f"line {i}", "seconds": 0.1, "path": rel}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    split("eval_seen", 4)
    items, why = eval_items(tmp_path, 3)
    assert [it.id for it in items] == ["eval_seen-000000", "eval_seen-000001", "jfk"] and not why
    split("gate", 5)
    items, why = eval_items(tmp_path, 3)
    assert [it.id for it in items] == ["gate-000000", "gate-000001", "gate-000002"] and not why
    assert [it.id for it in eval_items(tmp_path, 50)[0]] == [f"gate-{i:06d}" for i in range(5)]
    for flac in (tmp_path / "audio" / "gate").glob("*.flac"):
        flac.unlink()
    items, why = eval_items(tmp_path, 3)
    assert items == [] and why.endswith("gate.jsonl lists no recording that exists")


def test_default_calibration_audio_is_disjoint_from_what_the_gates_score(jfk_path, tmp_path, monkeypatch):
    """The shipped calibration set is the recipe's calib split: none of its recordings (by bytes or by
    sentence) is in the eval subset the WER gate scores, and jfk.flac is not among them."""
    import hashlib
    import json

    from fastslm.calibration.data import default_audio, find_audio
    from fastslm.calibration.evaluation import EvalItem
    from fastslm.calibration.gates import eval_items, unseen_by_calibration
    from fastslm.runtime.loading import DEMO_CALIBRATION, DEMO_EVAL_SUBSET

    monkeypatch.delenv("FASTSLM_CORPUS", raising=False)
    assert default_audio() == [DEMO_CALIBRATION / "audio" / "calib"]
    files = find_audio(default_audio())
    assert len(files) == 48
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    scored = [p for p in (DEMO_EVAL_SUBSET / "audio").rglob("*.flac")] + [jfk_path]
    assert not {digest(p) for p in files} & {digest(p) for p in scored}
    texts = lambda jsonl: {json.loads(line)["text"].lower() for line in Path(jsonl).read_text().splitlines()}  # noqa: E731
    calib_texts = texts(DEMO_CALIBRATION / "calib.jsonl")
    assert len(calib_texts) == 48
    assert not calib_texts & (texts(DEMO_EVAL_SUBSET / "eval_seen.jsonl") | texts(DEMO_EVAL_SUBSET / "eval_unseen.jsonl"))

    items, _ = eval_items(None, 50)
    kept, dropped = unseen_by_calibration(items, [{"path": str(f)} for f in files])
    assert len(items) == 41 and kept == items and not dropped
    # the old default (eval audio + jfk.flac) overlapped every item; a copy counts as the same recording
    copy = tmp_path / "copy.flac"
    copy.write_bytes(Path(items[0].audio).read_bytes())
    old_default = [{"path": str(copy)}, {"path": str(jfk_path)}, {"path": "gone/elsewhere.flac"}]
    kept, dropped = unseen_by_calibration(items, old_default)
    assert [d.id for d in dropped] == [items[0].id, "jfk"] and len(kept) == 39
    monkeypatch.setenv("FASTSLM_CORPUS", str(tmp_path))
    (tmp_path / "audio" / "calib").mkdir(parents=True)
    assert default_audio() == [tmp_path / "audio" / "calib"]
    assert isinstance(kept[0], EvalItem)
