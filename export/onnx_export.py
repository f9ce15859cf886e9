"""One generic ONNX export and one generic validation, both driven by a `GraphSpec` table.

export_graph:   torch.onnx.export(dynamo=True) of the spec's wrapper with flat positional
                inputs, dynamic dims from the table; weights go to external data when the
                graph would not fit protobuf's 2 GB limit.
check_graph:    onnx.checker (full, by path so external data works) and the graph's actual
                input/output names must be the table's.
validate_graph: ONNX Runtime vs the fp32 PyTorch model on every case of the table; max |diff|
                and cosine per output, held to the table's tolerance for the precision.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim

from ..runtime.errors import FastSLMError
from ..runtime.onnx_backend import session_options
from ..calibration.evaluation import cosine
from .graphs import Case, GraphSpec, TensorSpec, Tolerance

OPSET = 20  # measured to work with ORT 1.32 and TensorRT-RTX 1.7 (TOOLCHAIN.md)
# protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


class ExportError(FastSLMError):
    """An exported graph failed a check; the bundle is not written."""


@dataclass(frozen=True)
class OutputDiff:
    case: str
    output: str
    max_abs: float
    cosine: float
    scale: float  # max |reference|


def tensor_dtype(t: TensorSpec, compute: str) -> str:
    return compute if t.dtype == "compute" else t.dtype


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx and onnxscript print progress and notes meant for their developers; keep the user's terminal clean."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # node metadata torch.onnx writes (name scopes stay: calibration reads them)


def parameter_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_graph(
    spec: GraphSpec, module: nn.Module, path: Path, *, dtype: torch.dtype, opset: int = OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> str | None:
    """Export `module` (spec.wrap of the model in `dtype`) to `path`; returns the external data file name or None."""
    compute = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    example = sample_inputs(spec, spec.trace, 0, compute, seed=0)
    dims = {name: Dim(name, min=d.min) for name, d in spec.dims.items()}
    dynamic = tuple({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            tuple(torch.from_numpy(x) for x in example),
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            # The wrapper's forward is (*inputs): its dynamic shapes nest one level.
            dynamic_shapes=(dynamic,),
            opset_version=opset,
            verbose=False,
        )
        # torch records every node's Python stack: absolute paths of the build machine and source line
        # numbers, which would ship inside the graphs and change their bytes with any unrelated edit.
        for graph in (program.model.graph, *program.model.functions.values()):
            for node in graph.all_nodes():
                node.metadata_props.pop(STACK_TRACE_KEY, None)
        external = parameter_bytes(module) > external_data_threshold
        program.save(str(path), external_data=external)
    data_file = f"{path.name}.data"
    return data_file if external and (path.parent / data_file).is_file() else None


def read_io(path: Path) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as the manifest records them (symbolic dims as str)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: onnx.ValueInfoProto) -> dict:
        t = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": value.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def check_graph(spec: GraphSpec, path: Path, compute: str) -> tuple[list[dict], list[dict]]:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ExportError(f"{spec.name}: onnx.checker rejects the exported graph ({reason})") from None
    inputs, outputs = read_io(path)
    for kind, got, want in (("inputs", inputs, spec.inputs), ("outputs", outputs, spec.outputs)):
        got_names = [(t["name"], t["dtype"]) for t in got]
        want_names = [(t.name, tensor_dtype(t, compute)) for t in want]
        if got_names != want_names:
            raise ExportError(
                f"{spec.name}: the graph's {kind} {got_names[:4]}... differ from the table's {want_names[:4]}..."
            )
    return inputs, outputs


def sample_inputs(
    spec: GraphSpec, sizes: dict[str, int], position_offset: int, compute: str, seed: int
) -> list[np.ndarray]:
    """Random inputs for the table's tensors at `sizes`; compute-dtype inputs are rounded to it."""
    rng = np.random.default_rng(seed)
    arrays = []
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.fill == "normal":
            x = (rng.standard_normal(shape) * t.scale).astype(tensor_dtype(t, compute))
        elif t.fill == "positions":  # (B, T): past .. past + T - 1, shifted by the case's offset
            start = position_offset + sizes["past"]
            x = np.broadcast_to(np.arange(start, start + shape[-1], dtype=np.int64), shape).copy()
        elif t.fill == "last_positions":  # (K,): the last K of the T new positions
            x = np.arange(sizes["seq"] - shape[0], sizes["seq"], dtype=np.int64)
        elif t.fill == "past_length":  # (B,): the cached positions of each row
            x = np.full(shape, sizes["past"], dtype=np.int64)
        else:
            raise ValueError(f"{spec.name}: unknown fill {t.fill!r} for {t.name}")
        arrays.append(x)
    return arrays


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, cosine, max |reference|)."""
    a, b = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    if a.shape != b.shape:
        return float("inf"), 0.0, 0.0
    if not a.size:
        return 0.0, 1.0, 0.0
    return float(np.abs(a - b).max()), cosine(a, b), float(np.abs(a).max())


def passes(diff: OutputDiff, tol: Tolerance) -> bool:
    ok = np.isfinite(diff.max_abs)
    if tol.max_abs is not None:
        ok &= diff.max_abs <= tol.max_abs * max(1.0, diff.scale)
    if tol.min_cosine is not None:
        ok &= diff.cosine >= tol.min_cosine
    return bool(ok)


def validate_graph(
    spec: GraphSpec, reference: nn.Module, path: Path, *, precision: str, compute: str,
    cases: tuple[Case, ...] | None = None,
) -> list[OutputDiff]:
    """ORT (CPU) on `path` vs the fp32 PyTorch `reference` on each case; raises ExportError past tolerance."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), session_options(precision, providers), providers=providers)
    names = [t.name for t in spec.outputs]
    tol = spec.tolerances[precision]
    diffs = []
    for seed, case in enumerate(cases or spec.cases):
        feeds = sample_inputs(spec, case.sizes, case.position_offset, compute, seed=seed + 1)
        with torch.no_grad():
            # The same (already rounded) values, widened for the fp32 reference.
            ref_inputs = [torch.from_numpy(x.astype(np.float32) if x.dtype == np.float16 else x) for x in feeds]
            expected = reference.eval()(*ref_inputs)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, {t.name: x for t, x in zip(spec.inputs, feeds)})
        for name, e, g in zip(names, expected, got):
            diffs.append(OutputDiff(case.name, name, *compare(e.float().numpy(), g)))
    return hold_to(spec.name, precision, diffs, tol)


def hold_to(graph: str, precision: str, diffs: list[OutputDiff], tol: Tolerance) -> list[OutputDiff]:
    """`diffs`, or ExportError naming the first one past `tol`."""
    failed = [d for d in diffs if not passes(d, tol)]
    if failed:
        d = failed[0]
        allowed = [f"max |diff| {tol.max_abs:g} x max(1, |output|)"] if tol.max_abs is not None else []
        allowed += [f"cosine >= {tol.min_cosine}"] if tol.min_cosine is not None else []
        raise ExportError(
            f"{graph} ({precision}) differs from PyTorch on {d.case!r} {d.output}: max |diff| {d.max_abs:.3g} "
            f"(outputs up to {d.scale:.3g}), cosine {d.cosine:.7f}; allowed {' and '.join(allowed)}; nothing was written"
        )
    return diffs


def summarize(diffs: list[OutputDiff]) -> dict[str, dict[str, float]]:
    """Worst case per output name (KV outputs of all layers folded into present.*)."""
    out: dict[str, dict[str, float]] = {}
    for d in diffs:
        key = "present.*" if d.output.startswith("present.") else d.output
        cur = out.setdefault(key, {"max_abs_diff": 0.0, "min_cosine": 1.0, "reference_max_abs": 0.0})
        cur["max_abs_diff"] = max(cur["max_abs_diff"], d.max_abs)
        cur["min_cosine"] = min(cur["min_cosine"], d.cosine)
        cur["reference_max_abs"] = max(cur["reference_max_abs"], d.scale)
    return out
