"""fp16 storage (issue #15): fp16-exact weights stored as fp16, the same fp32 numbers from ONNX Runtime
(onnx-fp16w graphs, and the float layers of calibrated INT8 graphs)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fastslm.export.fp16_storage import store_weights_fp16  # noqa: E402


def _graph(path, exact: np.ndarray, inexact: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])
    nodes = [helper.make_node("MatMul", ["x", "w_exact"], ["h"]), helper.make_node("MatMul", ["h", "w_inexact"], ["y"])]
    inits = [numpy_helper.from_array(exact, "w_exact"), numpy_helper.from_array(inexact, "w_inexact")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path))


def test_exact_weights_become_fp16_and_outputs_do_not_change(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 64)).astype(np.float16).astype(np.float32)  # like an fp16 model folder's weights
    inexact = rng.standard_normal((64, 64)).astype(np.float32)  # like a computed table
    path = tmp_path / "g.onnx"
    _graph(path, exact, inexact)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    size = path.stat().st_size

    assert store_weights_fp16(path) == 1
    model = onnx.load(str(path))
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    assert dtypes == {"w_exact.fp16": TensorProto.FLOAT16, "w_inexact": TensorProto.FLOAT}
    assert model.graph.node[0].op_type == "Cast"
    onnx.checker.check_model(model)
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(before, after)
    assert path.stat().st_size < size - 64 * 64 * 2 + 200


def test_qdq_scales_stay_fp32_while_float_weights_become_fp16(tmp_path):
    """In an INT8 graph the layers kept float are stored as fp16; the Q/DQ parameters are left alone.

    ONNX Runtime fuses DequantizeLinear -> MatMul into an integer kernel only when the scale is an
    initializer: behind a Cast the layer would silently run in float."""
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (64, 2048), dtype=np.int8)
    scale = (2.0 ** rng.integers(-12, -4, 2048)).astype(np.float32)  # exact in fp16, and >= MIN_ELEMENTS values
    float_w = rng.standard_normal((2048, 64)).astype(np.float16).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w_float"], ["y"])]
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(np.zeros(2048, np.int8), "w_zero"), numpy_helper.from_array(float_w, "w_float")]
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 20)]),
              str(path))  # fmt: skip
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    assert store_weights_fp16(path) == 1
    dtypes = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert dtypes == {"w_q": TensorProto.INT8, "w_scale": TensorProto.FLOAT, "w_zero": TensorProto.INT8,
                      "w_float.fp16": TensorProto.FLOAT16}  # fmt: skip
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.array_equal(before, after)


def test_the_shipped_default_bundle_is_int8_with_its_float_layers_stored_fp16():
    """The CPU default (issue #15): the INT8 bundle, its audio tower's float layers stored as fp16."""
    from fastslm.runtime.bundle import read_manifest
    from fastslm.runtime.loading import DEFAULT_MODEL_DIR

    if not DEFAULT_MODEL_DIR.is_dir():
        pytest.skip("needs the shipped demo model")
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    assert (manifest["target"], manifest["precision"]) == ("onnx-int8", "int8")
    assert manifest["quantization"]["gates"]["passed"] and not manifest["quantization"].get("gates_overridden")
    model = onnx.load(str(DEFAULT_MODEL_DIR / manifest["graphs"]["audio_tower"]["file"]))
    dtypes = [i.data_type for i in model.graph.initializer]
    keep_float = manifest["quantization"]["audio_tower"]["keep_float"]
    assert dtypes.count(TensorProto.INT8) >= manifest["quantization"]["audio_tower"]["layers_int8"]
    assert dtypes.count(TensorProto.FLOAT16) >= len(keep_float)  # each float layer's weight, at least
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert all(i.data_type == TensorProto.FLOAT for i in model.graph.initializer if i.name in scales)
