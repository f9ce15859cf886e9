"""What `fastslm-export --target` can make: one registry entry per target.

A target names the runtime that loads the bundle, the precision of its graphs and how the
PyTorch model is prepared before export. TensorRT engines (trt-fp16, trt-int8) and the
calibrated onnx-int8 / onnx-int4 targets add entries here with a `post_process` step that
rewrites the exported fp32/fp16 ONNX graphs (quantize, build an engine) before validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..runtime.errors import OptionError
from .graphs import GraphSpec


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # the backend that loads the bundle: "onnx" or "tensorrt"
    precision: str  # key into GraphSpec.tolerances and the manifest's "precision"
    dtype: torch.dtype  # the PyTorch model is cast to this and then exported
    description: str
    # (graph file, spec, staging folder) -> None: rewrites the exported graph in place.
    post_process: Callable[[Path, GraphSpec, Path], None] | None = None

    @property
    def float_dtype(self) -> str:
        """The numpy/manifest name of the compute float type (KV cache, embedding table)."""
        return {torch.float32: "float32", torch.float16: "float16"}[self.dtype]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", "onnx", "fp32", torch.float32, "ONNX Runtime, fp32 weights and compute"),
        # Exported from the half-precision PyTorch model rather than converted afterwards: the
        # reference model keeps RMSNorm statistics, rotary angles, LayerNorm and the logits in
        # fp32 itself, and that mixed precision carries into the graph as it is. onnxruntime's
        # float16 converter round-trips blocked ops' outputs through fp16 (x^2 and the angles
        # lose the precision blocking was for) and leaves stale types that fail onnx.checker.
        Target("onnx-fp16", "onnx", "fp16", torch.float16, "ONNX Runtime, fp16 weights and compute, fp32 graph I/O"),
        # The fp16 ONNX graphs plus TensorRT engines built from them (export/tensorrt_build.py);
        # the graphs stay in the bundle so engines can be rebuilt on the deploying device.
        Target("trt-fp16", "tensorrt", "fp16", torch.float16, "TensorRT engines, fp16 weights and activations"),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
