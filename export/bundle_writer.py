"""Write a bundle: export + check + validate each graph, then the tables, tokenizer and manifest.

Everything is staged in a hidden folder next to --out and renamed into place only when every
step has passed, so an interrupted or failed export never leaves a half bundle, and --force
replaces an old bundle only once the new one is complete. The layout and the manifest schema
are documented in `fastslm.runtime.bundle`, which reads them.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..models.fastslm import FastSLM
from ..runtime.bundle import (
    BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, CONFIG_FILE, EMBEDDINGS_FILE, MANIFEST_FILE, TOKENIZER_FILE, sha256_file,
)
from ..runtime.errors import ModelFileError
from ..runtime.output_folder import OutputFolder
from .graphs import GRAPHS, GraphSpec, graph_specs
from .onnx_export import (
    EXTERNAL_DATA_THRESHOLD, OPSET, OutputDiff, check_graph, export_graph, summarize, validate_graph,
)
from .targets import Target, get_target

if TYPE_CHECKING:
    from .tensorrt_build import BuildOptions


@dataclass(frozen=True)
class ExportOptions:
    model: Path
    out: Path
    target: str = "onnx"
    force: bool = False
    opset: int = OPSET
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # bytes of weights; tests lower it
    progress: bool | None = None  # None: a progress bar on a terminal only
    trt: "BuildOptions | None" = None  # TensorRT builder options for trt-* targets
    trt_limits: dict = field(default_factory=dict)  # max_windows, max_context, prefill_chunk (None = default)
    quantization: Any = None  # calibrated targets: fastslm.calibration.build.QuantOptions (None = defaults)


@dataclass
class ExportReport:
    out: Path
    manifest: dict
    diffs: dict[str, list[OutputDiff]] = field(default_factory=dict)


def export_bundle(options: ExportOptions, log: Callable[[str], None] | None = None) -> ExportReport:
    target = get_target(options.target)
    model_dir = Path(options.model)
    # --out is checked (and its stage made) before the model is loaded: a bad path costs no minute of work.
    with OutputFolder(options.out, options.force, protect=[model_dir]) as output:
        return _export(options, target, model_dir, output, log)


def _export(options: ExportOptions, target: Target, model_dir: Path, output: OutputFolder, log) -> ExportReport:
    from tqdm import tqdm

    out, stage = output.out, output.path
    if not model_dir.is_dir():
        raise ModelFileError(
            f"model folder {model_dir} does not exist; pass a fastslm model folder (see `fastslm-convert`)"
        )
    if not (model_dir / CONFIG_FILE).is_file():
        raise ModelFileError(
            f"{model_dir} has no {CONFIG_FILE}: it is not a fastslm model folder (make one with `fastslm-convert`)"
        )
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ModelFileError(f"{model_dir} has no {TOKENIZER_FILE}: pass a complete fastslm model folder")

    # load; export, post-process, check, validate per graph; tables; manifest
    rewrites = target.post_process is not None or target.quantizer is not None
    steps = 1 + len(GRAPHS) * (4 if rewrites else 3) + 2 + (target.runtime == "tensorrt") + (target.quantizer is not None)
    with tqdm(total=steps, desc="fastslm-export", unit="step", file=sys.stderr, disable=_disable(options.progress)) as bar:
        write = log or (lambda line: tqdm.write(line, file=sys.stderr))

        def step(what: str) -> None:
            bar.set_postfix_str(what, refresh=True)

        step("loading the model")
        reference = FastSLM.from_pretrained(model_dir)  # fp32: what every graph is validated against
        same = target.dtype == reference.llm.lm_head.weight.dtype
        model = reference if same else copy.deepcopy(reference).to(target.dtype)  # the copy is what gets exported
        # Calibrated targets: one quantizer per export rewrites the graphs and gates the result.
        quantizer = target.quantizer(target, options.quantization, reference, write) if target.quantizer else None
        bar.update()

        graphs, diffs = {}, {}
        for spec in graph_specs(reference.config):
            graphs[spec.name], diffs[spec.name] = _one_graph(
                spec, model, reference, stage, target, options, step, bar, write, quantizer
            )
        step("writing the embedding table")
        table = model.llm.model.embed_tokens.weight.detach().numpy().astype(target.float_dtype)
        np.save(stage / EMBEDDINGS_FILE, table)
        shutil.copyfile(model_dir / CONFIG_FILE, stage / CONFIG_FILE)
        shutil.copyfile(model_dir / TOKENIZER_FILE, stage / TOKENIZER_FILE)
        bar.update()

        quantization = None
        if quantizer is not None:  # raises (nothing written) when a gate fails without an override
            step("accuracy gates")
            quantization = quantizer.gate(stage, graphs)
            bar.update()

        if target.runtime == "tensorrt":
            step("building TensorRT engines")
            from .tensorrt_build import BuildOptions, build_engines

            config = json.loads((stage / CONFIG_FILE).read_text())
            build_engines(stage, graphs, config, target.name, options.trt or BuildOptions(), **options.trt_limits)
            bar.update()

        step("writing the manifest")
        manifest = build_manifest(stage, target, reference.config.name, graphs, table, options.opset)
        if quantization is not None:
            manifest["quantization"] = quantization
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        output.publish()
        bar.update()
    write(f"fastslm-export: wrote {out} ({target.name}, {_size(out)})")
    return ExportReport(out, manifest, diffs)


def _one_graph(spec: GraphSpec, model, reference, stage: Path, target: Target, options: ExportOptions,
               step, bar, write, quantizer=None) -> tuple[dict, list[OutputDiff]]:  # fmt: skip
    path = stage / spec.file
    step(f"exporting {spec.name}")
    data_file = export_graph(spec, spec.wrap(model), path, dtype=target.dtype, opset=options.opset,
                             external_data_threshold=options.external_data_threshold)  # fmt: skip
    bar.update()
    post_process = quantizer.post_process if quantizer else target.post_process
    if post_process:
        step(f"{target.name}: post-processing {spec.name}")
        post_process(path, spec, stage)
        bar.update()
    step(f"checking {spec.name}")
    inputs, outputs = check_graph(spec, path, target.float_dtype)
    bar.update()
    step(f"validating {spec.name} against PyTorch")
    if quantizer:  # quantized graphs: the quantizer's tolerance and CPU session settings
        tolerance, diffs = quantizer.validate(spec, spec.wrap(reference), path)
    else:
        tolerance = spec.tolerances[target.precision]
        diffs = validate_graph(spec, spec.wrap(reference), path, precision=target.precision, compute=target.float_dtype)
    bar.update()
    for name, worst in summarize(diffs).items():
        write(f"{spec.name}: {name:<14} max |ORT - PyTorch| {worst['max_abs_diff']:.2e} (outputs up to "
              f"{worst['reference_max_abs']:.3g})  cosine {worst['min_cosine']:.7f}")  # fmt: skip
    entry = {
        "file": spec.file,
        "data_file": data_file,
        "precision": quantizer.graph_precision(spec.name) if quantizer else target.precision,
        "opset": _opset(path, options.opset),
        "description": spec.description,
        "inputs": inputs,
        "outputs": outputs,
        "dims": {name: asdict(d) for name, d in spec.dims.items()},
        "validation": {
            "reference": "PyTorch fp32",
            "tolerance": asdict(tolerance),
            "cases": {case.name: summarize([d for d in diffs if d.case == case.name]) for case in spec.cases},
        },
    }
    return entry, diffs


def build_manifest(stage: Path, target: Target, model_name: str, graphs: dict, table: np.ndarray, opset: int) -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    from .. import __version__

    files = sorted(p.name for p in stage.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "target": target.name,
        "runtime": target.runtime,
        "precision": target.precision,
        "model": {"name": model_name, "config_sha256": sha256_file(stage / CONFIG_FILE)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {
            "fastslm": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "opset": opset,
        },  # fmt: skip
        "graphs": graphs,
        "embeddings": {"file": EMBEDDINGS_FILE, "dtype": str(table.dtype), "shape": list(table.shape)},
        "files": {name: {"sha256": sha256_file(stage / name), "bytes": (stage / name).stat().st_size} for name in files},
    }


def _opset(path: Path, exported: int) -> int:
    """The graph's default-domain opset: INT4 weights move a graph from 20 to 21."""
    import onnx

    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return max([o.version for o in opsets if o.domain in ("", "ai.onnx")] or [exported])


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _size(folder: Path) -> str:
    n = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
