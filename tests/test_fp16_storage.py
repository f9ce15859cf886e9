"""onnx-fp16w (issue #15): fp16-exact weights stored as fp16, the same fp32 numbers from ONNX Runtime."""

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


def test_the_shipped_default_bundle_computes_in_fp32_from_fp16_storage():
    from fastslm.runtime.bundle import read_manifest
    from fastslm.runtime.loading import DEFAULT_MODEL_DIR

    if not DEFAULT_MODEL_DIR.is_dir():
        pytest.skip("needs the shipped demo model")
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    assert (manifest["target"], manifest["precision"]) == ("onnx-fp16w", "fp32")
    model = onnx.load(str(DEFAULT_MODEL_DIR / manifest["graphs"]["llm"]["file"]))
    stored = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(stored) >= 10  # the decoder's projection matrices
    assert all(t.type.tensor_type.elem_type == TensorProto.FLOAT for t in model.graph.input if t.name == "inputs_embeds")
