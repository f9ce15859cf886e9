"""Store an fp32 graph's weights as fp16 where that is exact; ONNX Runtime computes in fp32 as before.

Each float32 initializer whose every value survives the round trip to fp16 unchanged is
replaced by its fp16 copy and a Cast back to float32. ONNX Runtime's constant folding (on at
every optimization level from BASIC) runs those Casts once when the session is created, so the
session holds the same fp32 weights and runs the same kernels as the fp32 graph: the same
numbers and the same speed, from a file about half the size. On a CPU that is the point: fp16
arithmetic there is slower than fp32 (the shipped demo model decoded at 0.52x in fp16,
docs/QUANTIZATION.md), so fp16 weights are worth keeping only as storage.

Weights of an fp16 model folder are all exact; computed tables (sinusoids, rotary angles) and
weights that export folded with a scale usually are not and stay fp32, so nothing is rounded.
In a calibrated INT8 graph the layers kept float are stored the same way; the scales and zero
points of its Q/DQ nodes stay as they are, since ONNX Runtime fuses a Q/DQ pair into an integer
kernel only when they are initializers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_ELEMENTS = 1024  # small tensors (norm weights, biases) are not worth a Cast node each
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def store_weights_fp16(path: Path, spec=None, stage: Path | None = None) -> int:
    """Rewrite the ONNX graph at `path` in place; returns how many initializers became fp16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if path.stat().st_size > 1_500_000_000 or any(path.parent.glob(f"{path.name}*.data")):
        from ..runtime.errors import OptionError

        raise OptionError("onnx-fp16w rewrites graphs held in one file (< 2 GB); use --target onnx for this model")
    model = onnx.load(str(path))
    graph = model.graph
    qdq_inputs = {name for node in graph.node if node.op_type in QDQ_OPS for name in node.input}
    casts, converted = [], 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS or init.name in qdq_inputs:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue  # not exact in fp16: keep it fp32
        stored = numpy_helper.from_array(half, f"{init.name}.fp16")
        graph.initializer.remove(init)
        graph.initializer.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=TensorProto.FLOAT, name=f"{init.name}.to_fp32"))
        converted += 1
    nodes = casts + list(graph.node)  # the Casts first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return converted
