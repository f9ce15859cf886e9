"""Explicit quantization of exported graphs: Q/DQ nodes written by hand, one form for every runtime.

Two rewrites of an exported ONNX graph (fp32 or fp16), both following TensorRT's rules for
explicit quantization so that the same file serves ONNX Runtime (CPU, CUDA) and a TensorRT
build:

insert_int8_qdq (audio tower)   every Conv / MatMul / Gemm whose weight is a constant gets
    x -> QuantizeLinear -> DequantizeLinear (int8, symmetric, one scale per tensor from the
    calibrated range) on its activation input and DequantizeLinear(int8 weight, per output
    channel) on its weight. Biases stay float; MatMuls between two activations (attention
    scores and attention x values, i.e. Softmax outputs) stay float; layers in `keep_float`
    stay float. ONNX Runtime fuses the pattern into int8 kernels, TensorRT into int8 GEMMs.

insert_weight_only (LLM)        every MatMul / Gemm with a constant weight reads
    DequantizeLinear(int8 per output channel | int4 blocks of `block_size` along K). The
    activations stay float. ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits
    (8 or 4 bits); TensorRT builds weight-only INT8 / INT4 GEMMs from the same nodes. INT4 and
    blocks need opset 21, so those graphs are moved to it (20 -> 21 only widens types).

Layers are named by the PyTorch module they were exported from (the exporter's name scopes,
e.g. ``audio_tower.whisper.blocks.0.attn.query``): stable across fp32 and fp16 exports and across
checkouts, so calibrated ranges and keep-float lists carry from one graph to the next (a rename of
the model's modules bumps ranges.RANGES_FORMAT_VERSION).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.output_folder import with_new_file_mode

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
INT8_MAX = 127  # symmetric: [-127, 127], TensorRT's INT8 range for explicit quantization
# ONNX Runtime's x86 INT8 GEMMs take uint8 activations (int8 ones are shifted by 128) times int8
# weights. Without VNNI (AVX2, AVX-512 without VNNI) they use vpmaddubsw, which adds two adjacent
# products into an int16 and saturates once 255 * (|w0| + |w1|) > 32767: measured on an AVX2 EPYC,
# the demo audio tower's cosine fell to 0.989 and its WER rose 2.6 points. Weights within +-64 can never
# saturate (255 * 128 = 32640), but 7-bit weights cost the demo gate +1.00 pt audio WER against
# +0.50 at full range. So the graphs keep [-127, 127] and every fastslm session asks ONNX Runtime
# for its U8U8 kernels (runtime.onnx_backend.session_options: "session.x64quantprecision"), which
# widen to 16 bits before multiplying and are exact on every x86 CPU; `saturating_layers` checks
# what ONNX Runtime actually kept. TensorRT accumulates in int32 either way.
INT8_SATURATION_FREE_MAX = 64
# The integer kernels ONNX Runtime fuses Q/DQ patterns into, and the input index of their weight.
INTEGER_KERNEL_WEIGHT = {"MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1,
                         "QLinearMatMul": 3, "QLinearConv": 3, "QGemm": 3, "QAttention": 1}  # fmt: skip
INT16_MAX = 32767
U8_MAX = 255
INT4_MAX = 7  # [-8, 7] stored; symmetric scales use 7
BLOCK_OPSET = 21  # DequantizeLinear block_size and the INT4 type
# INT4 rows per scale along K: TensorRT-LLM's INT4 group size. Against 32, the published-size
# decoder reads 2.14 instead of 2.51 GB a token and decodes 1.26-1.45x as fast on a 2-core CPU
# (docs/SCALE.md); the accuracy gates still hold on the demo model. --block-size 32 trades that back.
INT4_BLOCK = 128
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class Layer:
    """A node that computes with a constant weight: what INT8 / INT4 GEMMs can take over."""

    key: str  # the PyTorch module path, e.g. audio_tower.whisper.blocks.0.attn.query
    node: str  # ONNX node name
    index: int  # position in graph.node (names may be empty or repeated in hand-made graphs)
    op: str
    activation: str  # the input tensor that is not a constant
    weight: str  # the weight initializer
    channel_axis: int  # the weight axis of the output channels (one scale each)


def module_path(node: onnx.NodeProto) -> str | None:
    """The PyTorch module a node came from, read from torch.onnx's name-scope metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # [..., 'audio_tower.whisper.conv1', 'conv1d']: the last entry names the op, the one before the module.
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Conv / MatMul / Gemm nodes with a constant float weight, in graph order, each with a unique key."""
    inits = {i.name: i for i in model.graph.initializer}
    layers, seen = [], {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in inits or x in inits or inits[w].data_type not in _FLOAT_TYPES:
            continue
        dims = list(inits[w].dims)
        if node.op_type == "MatMul":
            if len(dims) != 2:
                continue
            axis = 1  # B is (K, N): one scale per output column
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                continue
            axis = 0 if attrs.get("transB", 0) else 1
        else:  # Conv: W is (C_out, C_in / groups, *kernel)
            axis = 0
        key = module_path(node) or node.name
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # two weight GEMMs in one module (rare): keep keys unique
            key = f"{key}#{seen[key] - 1}"
        layers.append(Layer(key, node.name, index, node.op_type, x, w, axis))
    return layers


# ---------------------------------------------------------------------------------------------
# Weights


def quantize_per_channel(w: np.ndarray, axis: int, qmax: int = INT8_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel quantization: (int8 values, float32 scales shaped (w.shape[axis],))."""
    w = w.astype(np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_blocks(w: np.ndarray, block_size: int, qmax: int = INT4_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blocks of `block_size` rows along axis 0 of (K, N): (int8 values in [-qmax-1, qmax], scales (ceil(K/B), N))."""
    w = w.astype(np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    amax = np.abs(padded.reshape(blocks, block_size, n)).max(axis=1)  # (blocks, N)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.rint(padded.reshape(blocks, block_size, n) / scale[:, None, :]).reshape(-1, n)[:k]
    return np.clip(q, -qmax - 1, qmax).astype(np.int8), scale


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4 storage: two values a byte, the first in the low nibble."""
    flat = values.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    low = flat[0::2].astype(np.uint8) & 0x0F
    high = (flat[1::2].astype(np.uint8) & 0x0F) << 4
    return (low | high).astype(np.uint8).tobytes()


def _int4_tensor(name: str, values: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, values.shape, pack_int4(values), raw=True)


# ---------------------------------------------------------------------------------------------
# Rewriting


class _Rewriter:
    """Collects new initializers and nodes, then splices them into the graph in topological order."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.names = set(self.inits) | {x for n in self.graph.node for x in (*n.input, *n.output)}
        self.names |= {v.name for v in (*self.graph.input, *self.graph.output, *self.graph.value_info)}
        self.weights: dict[tuple[str, int], str] = {}  # (weight, bits) -> its dequantized tensor (tied weights once)
        self.before: dict[int, list[onnx.NodeProto]] = {}  # node index -> nodes to emit right before it
        self.head: list[onnx.NodeProto] = []  # weight DQ nodes (constant inputs): at the top
        self.new_inits: list[TensorProto] = []
        self.renamed: dict[tuple[int, int], str] = {}  # (node index, input index) -> new input

    def unique(self, base: str) -> str:
        name, n = base, 1
        while name in self.names:
            name, n = f"{base}_{n}", n + 1
        self.names.add(name)
        return name

    def add_init(self, tensor: TensorProto) -> str:
        self.inits[tensor.name] = tensor
        self.new_inits.append(tensor)
        return tensor.name

    def float_type(self, weight: str) -> int:
        return self.inits[weight].data_type

    def finish(self, opset: int | None = None) -> onnx.ModelProto:
        nodes = list(self.head)
        for index, node in enumerate(self.graph.node):
            nodes.extend(self.before.get(index, ()))
            for i in range(len(node.input)):
                if (index, i) in self.renamed:
                    node.input[i] = self.renamed[(index, i)]
            nodes.append(node)
        used = {name for n in nodes for name in n.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + [t for t in self.new_inits if t.name in used])
        if opset is not None:
            for imp in self.model.opset_import:
                if imp.domain in ("", "ai.onnx") and imp.version < opset:
                    if imp.version < opset - 1:  # 20 -> 21 only widens types; older graphs changed ops since
                        raise ValueError(f"INT4 weights need opset {opset}; this graph is opset {imp.version}: export it "
                                         f"with opset >= {opset - 1}")  # fmt: skip
                    imp.version = opset
            self.model.ir_version = max(self.model.ir_version, 10)  # opset 21 and INT4 came with IR version 10
        return self.model

    def dequantized_weight(self, layer: Layer, bits: int, block_size: int | None) -> str:
        """A DequantizeLinear of the layer's weight; returns the tensor that replaces the float weight."""
        if (layer.weight, bits) in self.weights:
            return self.weights[(layer.weight, bits)]
        tensor = self.inits[layer.weight]
        dtype = _FLOAT_TYPES[tensor.data_type]
        w = numpy_helper.to_array(tensor)
        base = layer.weight
        zero_point = []
        if bits == 8:
            q, scale = quantize_per_channel(w, layer.channel_axis)
            q_name = self.add_init(numpy_helper.from_array(q, self.unique(f"{base}_int8")))
            attrs = {"axis": layer.channel_axis}
            # Explicit zeros (same meaning as none): ONNX Runtime's U8U8 rewrite shifts weights and
            # zero points by 128, and without a per-channel zero point it writes a scalar one that
            # per-axis DequantizeLinear refuses at run time (measured, onnxruntime 1.32).
            zero_point = [self.add_init(numpy_helper.from_array(np.zeros(scale.shape, np.int8),
                                                                self.unique(f"{base}_zero_point")))]  # fmt: skip
        else:
            if layer.channel_axis != 1:  # (N, K) weight (Gemm transB): blocks run along its axis 1
                q, scale = quantize_blocks(w.T, block_size)
                q, scale, axis = q.T, scale.T, 1
            else:
                q, scale = quantize_blocks(w, block_size)
                axis = 0
            q_name = self.add_init(_int4_tensor(self.unique(f"{base}_int4"), q))
            attrs = {"axis": axis, "block_size": block_size}
        s_name = self.add_init(numpy_helper.from_array(scale.astype(dtype), self.unique(f"{base}_scale")))
        out = self.unique(f"{base}_dequantized")
        self.head.append(helper.make_node("DequantizeLinear", [q_name, s_name, *zero_point], [out], name=f"{out}_node",
                                          **attrs))  # fmt: skip
        self.weights[(layer.weight, bits)] = out
        return out


def insert_int8_qdq(
    model: onnx.ModelProto, amax: dict[str, float], keep_float: frozenset[str] | set[str] = frozenset()
) -> tuple[onnx.ModelProto, list[str]]:
    """INT8 Q/DQ on the activations and weights of every layer with a range in `amax` (by layer key).

    Returns the model (rewritten in place) and the keys of the layers now computed in INT8.
    Layers without a range or in `keep_float` stay float.
    """
    rw = _Rewriter(model)
    quantized, scale_of = [], {}  # activation tensor -> (scale, zero point) initializers
    for layer in find_layers(model):
        if layer.key in keep_float or layer.key not in amax:
            continue
        dtype = _FLOAT_TYPES[rw.float_type(layer.weight)]
        x = layer.activation
        if x not in scale_of:
            scale = max(float(amax[layer.key]), 1e-8) / INT8_MAX
            scale_of[x] = (rw.add_init(numpy_helper.from_array(np.array(scale, dtype), rw.unique(f"{x}_scale"))),
                           rw.add_init(numpy_helper.from_array(np.array(0, np.int8), rw.unique(f"{x}_zero_point"))))
        # A Q/DQ pair per consumer (q, k and v projections read one tensor): ONNX Runtime fuses
        # Q -> DQ -> MatMul into an int8 kernel only where each node has a single consumer.
        s, z = scale_of[x]
        q, dq = rw.unique(f"{x}_quantized"), rw.unique(f"{x}_dequantized")
        rw.before.setdefault(layer.index, []).extend([
            helper.make_node("QuantizeLinear", [x, s, z], [q], name=f"{q}_node"),
            helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{dq}_node"),
        ])  # fmt: skip
        rw.renamed[(layer.index, 0)] = dq
        rw.renamed[(layer.index, 1)] = rw.dequantized_weight(layer, 8, None)
        quantized.append(layer.key)
    return rw.finish(), quantized


def insert_weight_only(
    model: onnx.ModelProto, bits: int, block_size: int = INT4_BLOCK, keep_float: frozenset[str] | set[str] = frozenset()
) -> tuple[onnx.ModelProto, list[str]]:
    """Weight-only INT8 (per output channel) or INT4 (blocks along K) for MatMul / Gemm; Conv stays float."""
    if bits not in (8, 4):
        raise ValueError(f"weight-only quantization takes 8 or 4 bits, not {bits}")
    if bits == 4 and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"INT4 block size must be a power of two >= 16, not {block_size}")
    rw = _Rewriter(model)
    quantized = []
    for layer in find_layers(model):
        if layer.op == "Conv" or layer.key in keep_float:
            continue
        rw.renamed[(layer.index, 1)] = rw.dequantized_weight(layer, bits, block_size)
        quantized.append(layer.key)
    return rw.finish(BLOCK_OPSET if bits == 4 else None), quantized


def worst_u8s8_pair_sum(model: onnx.ModelProto) -> dict[str, int]:
    """Per INT8 layer of a graph as written (activation and weight both int8 Q/DQ): the largest sum
    that vpmaddubsw could form from two uint8 activations and two of the layer's weights,
    255 * 2 * max|w|. Which weights a kernel pairs depends on its packing, so the bound takes the
    worst pair; above INT16_MAX the layer needs ONNX Runtime's U8U8 kernels on CPUs without VNNI."""
    inits = {i.name: i for i in model.graph.initializer}
    return {key: _pair_sum(inits[q]) for key, q in int8_layers(model)}


def int8_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(layer key, int8 weight initializer) of the Conv / MatMul / Gemm nodes whose activation and
    weight both come from DequantizeLinear of int8: what ONNX Runtime fuses into integer GEMMs."""
    inits = {i.name: i for i in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}
    layers = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        x, w = (produced.get(name) for name in node.input[:2])
        if x and w and x.op_type == w.op_type == "DequantizeLinear" and w.input[0] in inits \
                and inits[w.input[0]].data_type == TensorProto.INT8:  # fmt: skip
            layers.append((module_path(node) or node.name, w.input[0]))
    return layers


def saturating_layers(optimized: onnx.ModelProto) -> dict[str, int]:
    """In a graph as ONNX Runtime optimized it for the CPU (SessionOptions.optimized_model_filepath):
    the integer kernels that would multiply uint8 by int8 weights beyond +-INT8_SATURATION_FREE_MAX,
    i.e. compute differently on CPUs without VNNI, with their worst pair sum. Empty when every
    integer kernel got uint8 weights (U8U8, exact) or 7-bit ones. Read from the graph alone, so the
    answer is the same on every x86 machine."""
    inits = {i.name: i for i in optimized.graph.initializer}
    found = {}
    for node in optimized.graph.node:
        index = INTEGER_KERNEL_WEIGHT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in inits:
            continue
        weight = inits[node.input[index]]
        if weight.data_type != TensorProto.INT8:
            continue
        pair_sum = _pair_sum(weight)
        if pair_sum > U8_MAX * 2 * INT8_SATURATION_FREE_MAX:
            found[node.name or node.output[0]] = pair_sum
    return found


def integer_kernels(optimized: onnx.ModelProto) -> int:
    """How many integer kernels ONNX Runtime fused (so that a check over them is not vacuous)."""
    return sum(1 for node in optimized.graph.node if node.op_type in INTEGER_KERNEL_WEIGHT)


def _pair_sum(weight: TensorProto) -> int:
    return U8_MAX * 2 * int(np.abs(numpy_helper.to_array(weight).astype(np.int32)).max(initial=0))


# ---------------------------------------------------------------------------------------------
# Files


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))  # external data (beside the graph) is read in


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` in the same layout as before: external data iff the graph had a .data file."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)  # fmt: skip
        with_new_file_mode(data)
    else:
        onnx.save(model, str(path))
