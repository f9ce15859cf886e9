"""What `fastslm-export --target` can make: one registry entry per target.

A target names the runtime that loads the bundle, the precision of its graphs and how the
PyTorch model is prepared before export. A `post_process` step rewrites the exported fp32/fp16
ONNX graphs before validation. The calibrated targets (onnx-int8, onnx-int4, trt-int8) name a
`quantizer` instead: made once per export from the options and the fp32 model
(`fastslm.calibration.build.Quantizer`), it quantizes each graph, sets its validation tolerance
and holds the finished bundle to its accuracy gates (docs/QUANTIZATION.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..runtime.bundle import COPIED, DECODER_CACHES, IN_PLACE
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
    # (target, quantization options or None, fp32 FastSLM, log) -> the per-export quantizer.
    quantizer: Callable[..., Any] | None = None
    # The LLM graph's KV-cache form without --decoder-cache (runtime/bundle.py DECODER_CACHES). In place
    # for the targets meant for the CPU wheel ([cpu]: onnxruntime >= 1.32, the first release that loads
    # that graph): fp32 compute, which is what CPUs run fast, and GroupQueryAttention has no fp32 CUDA
    # kernel anyway. Copied for onnx-fp16, the GPU / Jetson target: onnxruntime-gpu and JetPack's builds
    # are older than 1.32 and refuse the in-place graph, and the backend binds its buffers in host memory,
    # which a CUDA session would copy every step regardless. TensorRT runs only the copied form.
    decoder_cache: str = IN_PLACE

    @property
    def float_dtype(self) -> str:
        """The numpy/manifest name of the compute float type (KV cache, embedding table)."""
        return {torch.float32: "float32", torch.float16: "float16"}[self.dtype]


def _quantizer(*args: Any, **kwargs: Any) -> Any:
    from ..calibration.build import make_quantizer  # onnx, onnxruntime and the calibration code only when used

    return make_quantizer(*args, **kwargs)


def _store_weights_fp16(path: Path, spec: GraphSpec, stage: Path) -> None:
    from .fp16_storage import store_weights_fp16

    store_weights_fp16(path)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", "onnx", "fp32", torch.float32, "ONNX Runtime, fp32 weights and compute"),
        # Exported from the half-precision PyTorch model rather than converted afterwards: the
        # reference model keeps RMSNorm statistics, rotary angles, LayerNorm and the logits in
        # fp32 itself, and that mixed precision carries into the graph as it is. onnxruntime's
        # float16 converter round-trips blocked ops' outputs through fp16 (x^2 and the angles
        # lose the precision blocking was for) and leaves stale types that fail onnx.checker.
        Target("onnx-fp16", "onnx", "fp16", torch.float16, "ONNX Runtime, fp16 weights and compute, fp32 graph I/O",
               decoder_cache=COPIED),
        # The fp32 graphs with their fp16-exact weights stored as fp16 (export/fp16_storage.py): fp32
        # numbers and CPU speed from about half the file; the demo model's default bundle.
        Target("onnx-fp16w", "onnx", "fp32", torch.float32,
               "ONNX Runtime, fp32 compute; weights stored as fp16 where exact, cast once at load",
               post_process=_store_weights_fp16),
        # The fp16 ONNX graphs plus TensorRT engines built from them (export/tensorrt_build.py);
        # the graphs stay in the bundle so engines can be rebuilt on the deploying device.
        Target("trt-fp16", "tensorrt", "fp16", torch.float16, "TensorRT engines, fp16 weights and activations",
               decoder_cache=COPIED),
        # Calibrated explicit quantization (Q/DQ in the graphs); the graphs' float parts stay fp32 for
        # ONNX Runtime on CPUs (fp16 arithmetic is slow or missing there) and fp16 for TensorRT.
        Target("onnx-int8", "onnx", "int8", torch.float32,
               "ONNX Runtime: INT8 audio tower (calibrated Q/DQ), INT8 weight-only LLM", quantizer=_quantizer),
        Target("onnx-int4", "onnx", "int4", torch.float32,
               "ONNX Runtime: INT8 audio tower (calibrated Q/DQ), INT4 block-quantized weight-only LLM",
               quantizer=_quantizer),
        Target("trt-int8", "tensorrt", "int8", torch.float16,
               "TensorRT engines: INT8 audio tower (calibrated Q/DQ), INT8 (or INT4) weight-only LLM, fp16 elsewhere",
               quantizer=_quantizer, decoder_cache=COPIED),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def decoder_cache_for(target: Target, requested: str | None) -> str:
    """The LLM graph's KV-cache form: `requested` (--decoder-cache) if the target can run it, else the target's."""
    if requested is None:
        return target.decoder_cache
    if requested not in DECODER_CACHES:
        raise OptionError(f"unknown --decoder-cache {requested!r}; choose {' or '.join(DECODER_CACHES)}")
    if requested == IN_PLACE and target.runtime != "onnx":
        raise OptionError(
            f"--decoder-cache {IN_PLACE} is ONNX Runtime's attention op, which TensorRT cannot run: "
            f"{target.name} bundles keep the {COPIED} form (drop the option)"
        )
    return requested
