"""Graphs of a model too large to hold in fp32: traced without weights, weights streamed in.

A published-size FastSLM's LLM is 4 B parameters: 16 GB in fp32, more than a 24 GB machine
can hold next to a copy made by the exporter's optimizer. Here no full copy ever exists:

1. trace  the decoder wrapper is built under FakeTensorMode (shapes, no memory) and exported
          with torch.onnx (dynamo) with its optimizer off (it would read the weights); the graph
          is saved without initializers, so it names every weight by its module path.
   (The audio tower goes the same way: tracing it with its weights made the exporter's optimizer
   and serializer peak at 13.5 GB for a 2.8 GB fp32 published-size audio tower.)
2. fill   each named weight is read from the model folder's safetensors (one tensor at a time,
          memory-mapped) and appended to one external-data file, 4 KiB aligned:
          - a Linear weight (its graph reads `Transpose(perm 1,0) -> MatMul`) is written
            pre-transposed (K, N), or with `bits` quantized into a DequantizeLinear in
            calibration.qdq's weight-only form (INT8 per output channel / INT4 blocks along K,
            the form ONNX Runtime fuses into MatMulNBits), in slices of K so a 151,936 x 2,560
            table never exists in fp32 whole;
          - everything else (norm weights, rotary frequencies) in the graph's float type.
3. check  `reference_outputs` runs the PyTorch decoder layer by layer, each layer's fp32
          weights read from the folder and freed after it, on the graph table's random cases:
          the streamed graph is validated against fp32 PyTorch as every other graph is.

The embedding table for the runtime is written the same way (`write_embedding_table`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..calibration.qdq import BLOCK_OPSET, INT4_BLOCK, INT8_MAX, module_path, pack_int4, quantize_blocks, quantize_per_channel
from ..models.fastslm import FastSLM, FastSLMConfig
from ..models.qwen3 import Qwen3DecoderLayer, RMSNorm, rope_cos_sin, rope_frequencies
from ..models.weights import SafetensorsFolder
from ..runtime.bundle import kv_input_name
from .graphs import Case, GraphSpec
from .onnx_export import OPSET, _quiet_exporter, sample_inputs

DERIVED_SUFFIXES = ("_pos_embeds", "positional_embedding")  # as models.fastslm._derived_keys
ALIGN = 4096  # external data offsets: page-aligned, so runtimes can memory-map each tensor
SLICE_ELEMENTS = 16 * 2**20  # fp32 elements of a weight converted at a time (64 MB)
_ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
_NP_FLOAT = {torch.float32: np.float32, torch.float16: np.float16}


@dataclass
class StreamReport:
    """What the fill step wrote: for the manifest and the log."""

    data_file: str
    bytes_written: int = 0
    quantized: list[str] = field(default_factory=list)  # layer keys (module paths) with quantized weights
    linear: list[str] = field(default_factory=list)  # every weight matrix's layer key, quantized or not
    float_weights: int = 0


def trace_structure(spec: GraphSpec, config: FastSLMConfig, path: Path, dtype: torch.dtype, opset: int = OPSET,
                    fold_constants: bool = False) -> dict:  # fmt: skip
    """Export the graph of `spec` without weights to `path`; returns {weight name: (shape, dtype)} it refers to.

    `fold_constants`: fold the graph's constant subgraphs (reduction axes, shapes) into small
    initializers, as the exporter's optimizer does when it holds the weights: TensorRT's parser
    needs axes as build-time constants ("Axis input must resolve to a build-time constant").
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import Dim

    compute = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    default = torch.get_default_dtype()
    try:  # Module.to() cannot swap fake parameters: make them in `dtype` from the start
        torch.set_default_dtype(dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            wrapper = spec.wrap(FastSLM(config)).eval()
            for name, buffer in list(wrapper.named_buffers()):  # sinusoids are made in fp32: cast as .to() would
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    owner, _, leaf = name.rpartition(".")
                    wrapper.get_submodule(owner).register_buffer(leaf, buffer.to(dtype))
    finally:
        torch.set_default_dtype(default)
    example = sample_inputs(spec, spec.trace, 0, compute, seed=0)
    dims = {name: Dim(name, min=d.min) for name, d in spec.dims.items()}
    dynamic = tuple({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    with _quiet_exporter(), torch.no_grad(), _without_guard_code():
        program = torch.onnx.export(
            wrapper, tuple(torch.from_numpy(x) for x in example), dynamo=True,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=(dynamic,), opset_version=opset, optimize=False, verbose=False,
        )  # fmt: skip
        program.save(str(path), include_initializers=False)
        if fold_constants:
            import onnxscript.optimizer

            onnx.save(onnxscript.optimizer.optimize(onnx.load(str(path))), str(path))
    state = dict(wrapper.named_parameters(remove_duplicate=False))
    state.update(wrapper.named_buffers(remove_duplicate=False))
    found = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    # Rotary frequencies are a plain fp32 attribute (see Qwen3ForCausalLM), traced as a constant.
    found["llm.inv_freq"] = ((config.qwen3.head_dim // 2,), torch.float32)
    return found


@contextlib.contextmanager
def _without_guard_code():
    """torch.export, done, renders its shape guards as code from the graph's fake values; with the
    weights faked in our own FakeTensorMode beside torch.export's, a graph holding an ONNX symbolic
    op (ONNX Runtime's attention, models/qwen3.py) has values of both modes and that rendering
    stops. The ONNX graph does not use those guards: skip them while tracing."""
    from torch.export import exported_program

    original = exported_program._convert_guards_to_code
    exported_program._convert_guards_to_code = lambda graph_module: []
    try:
        yield
    finally:
        exported_program._convert_guards_to_code = original


class _DataWriter:
    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def tensor(self, name: str, data_type: int, dims: tuple[int, ...], chunks) -> TensorProto:
        """An initializer whose bytes (the `chunks` iterable of arrays / bytes) go to the data file."""
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        for chunk in chunks:
            raw = chunk if isinstance(chunk, (bytes, bytearray)) else np.ascontiguousarray(chunk).tobytes()
            self.file.write(raw)
            self.offset += len(raw)
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        self.file.close()


def _k_slices(k: int, n: int, block: int):
    """Row ranges of a (K, N) weight, multiples of `block` long, about SLICE_ELEMENTS each."""
    rows = max(block, (SLICE_ELEMENTS // max(n, 1)) // block * block)
    return [(s, min(s + rows, k)) for s in range(0, k, rows)]


def _transposed_slices(w: torch.Tensor, block: int):
    """(K rows slice of W^T as fp32 numpy) for a torch (N, K) weight, slice by slice."""
    n, k = w.shape
    for s, e in _k_slices(k, n, block):
        yield w[:, s:e].to(torch.float32).T.contiguous().numpy()


def _stored_name(name: str, config: FastSLMConfig) -> str:
    """The model folder's name for a graph weight (graph wrappers keep the model's module paths)."""
    if name == "llm.lm_head.weight" and config.qwen3.tie_word_embeddings:
        return "llm.model.embed_tokens.weight"
    return name


def fill_weights(
    structure: Path, out: Path, store: SafetensorsFolder, config: FastSLMConfig, weights: dict,
    *, bits: int | None = None, block_size: int = INT4_BLOCK, keep_float: frozenset[str] | set[str] = frozenset(),
    progress: Callable[[int], None] | None = None,
) -> StreamReport:  # fmt: skip
    """Write `out` (+ `out`.data): the traced `structure` with every weight it names read from `store`."""
    model = onnx.load(str(structure))
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    needed = list(dict.fromkeys(i for n in graph.node for i in n.input if i and i not in produced))
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for i in node.input:
            consumers.setdefault(i, []).append(index)
    data = out.with_name(out.name + ".data")
    writer, report = _DataWriter(data), StreamReport(data.name)
    dropped: set[int] = set()  # node indices (the Transposes the written weights replace)
    renames: dict[str, str] = {}
    inits, new_nodes = [], []
    try:
        for name in needed:
            if name not in weights:
                raise ValueError(f"the traced graph reads {name!r}, which is not a weight of the model")
            shape, dtype = weights[name]
            if name.endswith("inv_freq"):  # computed, never stored (see Qwen3ForCausalLM)
                q = config.qwen3
                inits.append(writer.tensor(name, _ONNX_FLOAT[torch.float32], shape,
                                           [rope_frequencies(q.head_dim, q.rope_theta, torch.device("cpu")).numpy()]))
                continue
            if name.endswith(DERIVED_SUFFIXES):  # sinusoid tables: recomputed, never stored
                from ..models.whisper_encoder import sinusoids

                inits.append(writer.tensor(name, _ONNX_FLOAT[dtype], shape, [sinusoids(*shape).to(dtype).numpy()]))
                report.float_weights += 1
                continue
            w = store.get(_stored_name(name, config))
            if tuple(w.shape) != shape:
                raise ValueError(f"{name}: the model folder holds {list(w.shape)}, the graph expects {list(shape)}")
            users = consumers[name]
            transposes = [i for i in users if graph.node[i].op_type == "Transpose" and _perm(graph.node[i]) == [1, 0]]
            linear = len(shape) == 2 and shape[0] % 2 == 0 and len(transposes) == len(users) and all(
                graph.node[c].op_type == "MatMul" and graph.node[c].input[1] == graph.node[t].output[0]
                for t in transposes for c in consumers.get(graph.node[t].output[0], [])
            )  # fmt: skip
            if not linear:
                inits.append(writer.tensor(name, _ONNX_FLOAT[dtype], shape, [w.to(dtype).numpy()]))
                report.float_weights += 1
            else:
                value = graph.node[transposes[0]].output[0]  # what the MatMuls read: W^T
                matmul = graph.node[consumers[value][0]]
                key = module_path(matmul) or name.removesuffix(".weight")
                for t in transposes[1:]:
                    renames[graph.node[t].output[0]] = value
                dropped.update(transposes)
                report.linear.append(key)
                if bits is None or key in keep_float:
                    inits.append(writer.tensor(value, _ONNX_FLOAT[dtype], shape[::-1],
                                               (s.astype(_NP_FLOAT[dtype]) for s in _transposed_slices(w, 1))))  # fmt: skip
                    report.float_weights += 1
                else:
                    quantized, node = _quantized(writer, name.removesuffix(".weight"), value, w, bits, block_size, dtype)
                    inits += quantized
                    new_nodes.append(node)
                    report.quantized.append(key)
            if progress is not None:
                progress(w.numel() * w.element_size())
            del w
    finally:
        writer.close()
    report.bytes_written = writer.offset
    kept = [n for i, n in enumerate(graph.node) if i not in dropped] + new_nodes
    for n in kept:
        for i, x in enumerate(n.input):
            if x in renames:
                n.input[i] = renames[x]
    _replace_nodes(graph, kept)
    graph.initializer.extend(inits)
    if bits == 4:
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = max(imp.version, BLOCK_OPSET)
        model.ir_version = max(model.ir_version, 10)
    onnx.save(model, str(out))
    return report


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _quantized(writer: _DataWriter, base: str, value: str, w: torch.Tensor, bits: int, block_size: int,
               dtype: torch.dtype):  # fmt: skip
    """([values, scales(, zero points)] initializers, DequantizeLinear node -> `value`) for a torch (N, K) Linear weight."""
    n, k = w.shape
    if bits == 8:  # per output channel: the scales need the whole column, so one pass for them first
        amax = w.abs().amax(dim=1).to(torch.float32).numpy()
        scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
        q = writer.tensor(f"{base}_int8", TensorProto.INT8, (k, n),
                          (np.clip(np.rint(s / scale[None, :]), -INT8_MAX, INT8_MAX).astype(np.int8) for s in _transposed_slices(w, 1)))  # fmt: skip
        attrs = {"axis": 1}
        scales = scale
        # Explicit zeros, as calibration/qdq.py writes them: without them ONNX Runtime's exact U8U8
        # rewrite of int8 weights (session_options) gives a per-axis DequantizeLinear a scalar zero
        # point, which it then refuses at run time (the published-size trt-int8 export failed so).
        zeros = [writer.tensor(f"{base}_zero_point", TensorProto.INT8, scale.shape, [np.zeros(scale.shape, np.int8)])]
    else:
        parts: list[np.ndarray] = []

        def packed():
            for s in _transposed_slices(w, block_size):
                values, scale = quantize_blocks(s, block_size)
                parts.append(scale)
                yield pack_int4(values)

        q = writer.tensor(f"{base}_int4", TensorProto.INT4, (k, n), packed())
        scales = np.concatenate(parts)
        attrs = {"axis": 0, "block_size": block_size}
        zeros = []
    s_init = writer.tensor(f"{base}_scale", _ONNX_FLOAT[dtype], scales.shape, [scales.astype(_NP_FLOAT[dtype])])
    initializers = [q, s_init, *zeros]
    node = helper.make_node("DequantizeLinear", [t.name for t in initializers], [value], name=f"{base}_dequantize", **attrs)
    return initializers, node


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Put `nodes` into `graph` in topological order (new DequantizeLinear nodes were appended at the end)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(i)
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            stack.extend((produced_by[x], False) for x in nodes[i].input if x in produced_by and not state[produced_by[x]])
    copies = [onnx.NodeProto() for _ in order]
    for c, i in zip(copies, order):
        c.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)


def quantized_precision(bits: int | None, float_precision: str) -> str:
    return float_precision if bits is None else f"int{bits}"


# ---------------------------------------------------------------------------------------------
# The PyTorch reference, one layer in memory at a time


def dequantized(w: torch.Tensor, bits: int | None, block_size: int = INT4_BLOCK) -> torch.Tensor:
    """A torch (N, K) Linear weight as the graph computes with it: quantized as `fill_weights` writes it, then dequantized."""
    if bits is None:
        return w.to(torch.float32)
    if bits == 8:
        amax = w.abs().amax(dim=1, keepdim=True).to(torch.float32)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        return torch.clamp(torch.round(w.to(torch.float32) / scale), -INT8_MAX, INT8_MAX) * scale
    parts = []
    for s in _transposed_slices(w, block_size):  # (k, N) slices, as written
        values, scale = quantize_blocks(s, block_size)
        parts.append(values.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: len(values)])
    return torch.from_numpy(np.concatenate(parts).T.copy())


def _load_module(module: torch.nn.Module, store: SafetensorsFolder, prefix: str, bits: int | None = None,
                 block_size: int = INT4_BLOCK, keep_float: frozenset[str] = frozenset()) -> torch.nn.Module:  # fmt: skip
    tensors = {}
    for name, p in module.named_parameters():
        w = store.get(prefix + name)
        linear = p.dim() == 2 and f"{prefix}{name}".removesuffix(".weight") not in keep_float
        tensors[name] = dequantized(w, bits, block_size) if linear else w.to(torch.float32)
    module.load_state_dict(tensors, assign=True, strict=True)
    return module.eval()


def reference_outputs(store: SafetensorsFolder, config: FastSLMConfig, spec: GraphSpec, cases: tuple[Case, ...],
                      compute: str, progress: Callable[[], None] | None = None, *, bits: int | None = None,
                      block_size: int = INT4_BLOCK, keep_float: frozenset[str] = frozenset()) -> list[tuple[list[np.ndarray], list]]:  # fmt: skip
    """Per case: (the inputs fed, the fp32 PyTorch outputs in the spec's order), the decoder run layer by layer.

    With `bits`, the Linear weights are the graph's own quantized values (dequantized to fp32):
    what is compared is then the graph's computation, not the quantization error, which on
    random weights compounds over 36 layers (INT4 logits cosine 0.79 against the float model on
    random inputs at the published size) and which the accuracy gates measure on speech.
    """
    d = config.qwen3
    inv_freq = rope_frequencies(d.head_dim, d.rope_theta, torch.device("cpu"))
    runs = []
    for seed, case in enumerate(cases):
        feeds = sample_inputs(spec, case.sizes, case.position_offset, compute, seed=seed + 1)
        named = {t.name: a for t, a in zip(spec.inputs, feeds)}
        x = torch.from_numpy(named["inputs_embeds"].astype(np.float32))
        cos, sin = rope_cos_sin(torch.from_numpy(named["position_ids"]), inv_freq, torch.float32)
        past = [torch.from_numpy(named[kv_input_name(i, kind)].astype(np.float32))
                for i in range(d.num_layers) for kind in ("key", "value")]  # fmt: skip
        runs.append({"feeds": feeds, "x": x, "cos": cos, "sin": sin, "past": past, "present": [],
                     "index": torch.from_numpy(named["logits_index"])})  # fmt: skip
    with torch.no_grad():
        for i in range(d.num_layers):
            with torch.device("meta"):
                layer = Qwen3DecoderLayer(d)
            layer = _load_module(layer, store, f"llm.model.layers.{i}.", bits, block_size, keep_float)
            for r in runs:
                r["x"], k, v = layer(r["x"], r["cos"], r["sin"], r["past"][2 * i], r["past"][2 * i + 1])
                r["present"] += [k, v]
            del layer
            if progress is not None:
                progress()
        norm = _load_module(RMSNorm(d.hidden_size, d.rms_norm_eps), store, "llm.model.norm.")
        head_name = "llm.model.embed_tokens.weight" if d.tie_word_embeddings else "llm.lm_head.weight"
        head_kept = "llm.lm_head" in keep_float
        head = dequantized(store.get(head_name), None if head_kept else bits, block_size)
        out = []
        for r in runs:
            logits = torch.nn.functional.linear(norm(r["x"].index_select(1, r["index"])), head)
            out.append((r["feeds"], [logits.numpy()] + [t.numpy() for t in r["present"]]))
        del head
    return out


def validate_outputs(spec: GraphSpec, path: Path, expected: list, tolerance, precision: str, session=None) -> list:
    """ORT on `path` against `reference_outputs`; raises ExportError past `tolerance` (as validate_graph does)."""
    import onnxruntime as ort

    from ..runtime.onnx_backend import session_options
    from .onnx_export import OutputDiff, compare, hold_to

    if session is None:
        providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), session_options(precision, providers), providers=providers)
    names = [t.name for t in spec.outputs]
    diffs = []
    for case, (feeds, reference) in zip(spec.cases, expected):
        got = session.run(names, {t.name: x for t, x in zip(spec.inputs, feeds)})
        diffs += [OutputDiff(case.name, n, *compare(e, g)) for n, e, g in zip(names, reference, got)]
    return hold_to(spec.name, precision, diffs, tolerance)


# ---------------------------------------------------------------------------------------------
# The runtime's embedding table


def write_embedding_table(store: SafetensorsFolder, path: Path, dtype: str, rows_at_once: int = 8192) -> tuple[int, int]:
    """embed_tokens as a .npy in `dtype`, converted a slice of rows at a time; returns its shape."""
    name = "llm.model.embed_tokens.weight"
    w = store.get(name)
    table = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(w.shape))
    for s in range(0, w.shape[0], rows_at_once):
        table[s : s + rows_at_once] = w[s : s + rows_at_once].to(torch.float32).numpy().astype(dtype)
    table.flush()
    shape = tuple(table.shape)
    del table, w
    return shape
