"""Write a bundle: export + check + validate each graph, then the tables, tokenizer and manifest.

Everything is staged in a hidden folder next to --out and renamed into place only when every
step has passed, so an interrupted or failed export never leaves a half bundle, and --force
replaces an old bundle only once the new one is complete. The layout and the manifest schema
are documented in `fastslm.runtime.bundle`, which reads them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import platform
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..calibration.qdq import INT4_BLOCK
from ..models.fastslm import PARTS, FastSLM, read_config
from ..runtime.bundle import (
    BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, CONFIG_FILE, COPIED, EMBEDDINGS_FILE, IN_PLACE, LLM, MANIFEST_FILE,
    TOKENIZER_FILE, sha256_file,
)
from ..runtime.errors import ModelFileError, OptionError
from ..runtime.output_folder import OutputFolder
from .graphs import GraphSpec, graph_specs
from .onnx_export import (
    EXTERNAL_DATA_THRESHOLD, OPSET, OutputDiff, check_graph, export_graph, summarize, validate_graph,
)
from .targets import Target, decoder_cache_for, get_target

if TYPE_CHECKING:
    from .tensorrt_build import BuildOptions

# Above this many bytes of fp32 LLM weights the LLM is exported streamed: the in-memory path holds
# the fp32 model, an fp16 copy and the optimizer's transposed weights (3.3x the weights measured
# at the published widths), which for Qwen3-4B is far beyond a 24 GB machine.
STREAM_LLM_ABOVE = 2**30


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
    trt_limits: dict = field(default_factory=dict)  # max_windows, max_context, prefill_chunk (None = default), one_llm_profile (None = by host memory)
    quantization: Any = None  # calibrated targets: fastslm.calibration.build.QuantOptions (None = defaults)
    # The graphs traced without weights and filled from the model folder tensor by tensor
    # (export/streamed.py; the LLM is then never loaded); None: when its fp32 LLM exceeds STREAM_LLM_ABOVE.
    stream_llm: bool | None = None
    # The LLM graph's KV-cache form, "in-place" or "copied" (runtime/bundle.py); None: the target's default.
    decoder_cache: str | None = None


@dataclass
class ExportReport:
    out: Path
    manifest: dict
    diffs: dict[str, list[OutputDiff]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


def export_bundle(options: ExportOptions, log: Callable[[str], None] | None = None) -> ExportReport:
    target = get_target(options.target)
    decoder_cache = decoder_cache_for(target, options.decoder_cache)
    if decoder_cache == IN_PLACE:
        import onnxruntime

        from ..runtime.onnx_backend import IN_PLACE_CACHE_ONNXRUNTIME, loads_in_place_cache

        if not loads_in_place_cache(onnxruntime.__version__):  # the graph is validated in ONNX Runtime
            raise OptionError(
                f"the in-place decoder cache needs onnxruntime >= {IN_PLACE_CACHE_ONNXRUNTIME} to validate it, this is "
                f"{onnxruntime.__version__}: pip install 'onnxruntime>={IN_PLACE_CACHE_ONNXRUNTIME}', "
                f"or pass --decoder-cache {COPIED}"
            )
    model_dir = Path(options.model)
    # --out is checked (and its stage made) before the model is loaded: a bad path costs no minute of work.
    with OutputFolder(options.out, options.force, protect=[model_dir]) as output:
        return _export(options, target, decoder_cache, model_dir, output, log)


def _export(options: ExportOptions, target: Target, decoder_cache: str, model_dir: Path, output: OutputFolder,
            log) -> ExportReport:  # fmt: skip
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
    config = read_config(model_dir)
    streamed = options_streamed(options, config)
    specs = graph_specs(config, decoder_cache)
    rewrites = target.post_process is not None or target.quantizer is not None
    steps = 1 + len(specs) * (4 if rewrites else 3) + 2 + (target.runtime == "tensorrt") + (target.quantizer is not None)
    steps += streamed and not rewrites  # the streamed LLM: trace, fill, check, validate
    with (tqdm(total=steps, desc="fastslm-export", unit="step", file=sys.stderr, disable=_disable(options.progress)) as bar,
          _redrawn_every_second(bar)):  # fmt: skip
        write = log or (lambda line: tqdm.write(line, file=sys.stderr))

        timings: dict[str, float] = {}  # step -> seconds: what docs/SCALE.md reports per stage
        current = {"what": None, "since": time.perf_counter()}

        def step(what: str | None) -> None:
            now = time.perf_counter()
            if current["what"] is not None:
                timings[current["what"]] = timings.get(current["what"], 0.0) + now - current["since"]
            current.update(what=what, since=now)
            if what is not None:
                bar.set_postfix_str(what, refresh=True)

        step("loading the model")
        # fp32: what every graph is validated against. A streamed LLM is read tensor by tensor instead.
        reference = FastSLM.from_pretrained(model_dir, parts=("audio_tower",) if streamed else PARTS)
        same = target.dtype == reference.llm.lm_head.weight.dtype
        # the copy is what gets exported (streamed graphs read the model folder instead)
        model = reference if same or streamed else copy.deepcopy(reference).to(target.dtype)
        # Calibrated targets: one quantizer per export rewrites the graphs and gates the result.
        quantizer = target.quantizer(target, options.quantization, reference, write) if target.quantizer else None
        bar.update()

        graphs, diffs = {}, {}
        for spec in specs:
            if streamed and spec.name == LLM:
                graphs[spec.name], diffs[spec.name] = _streamed_graph(
                    spec, model_dir, reference.config, stage, target, options, step, bar, write, quantizer
                )
                continue
            graphs[spec.name], diffs[spec.name] = _one_graph(
                spec, model, reference, stage, target, options, step, bar, write, quantizer
            )
        graphs[LLM]["decoder_cache"] = decoder_cache
        step("writing the embedding table")
        if streamed:
            from ..models.weights import SafetensorsFolder
            from .streamed import write_embedding_table

            shape = write_embedding_table(SafetensorsFolder(model_dir), stage / EMBEDDINGS_FILE, target.float_dtype)
            table = {"dtype": target.float_dtype, "shape": list(shape)}
        else:
            array = model.llm.model.embed_tokens.weight.detach().numpy().astype(target.float_dtype)
            np.save(stage / EMBEDDINGS_FILE, array)
            table = {"dtype": str(array.dtype), "shape": list(array.shape)}
            del array
        shutil.copyfile(model_dir / CONFIG_FILE, stage / CONFIG_FILE)
        shutil.copyfile(model_dir / TOKENIZER_FILE, stage / TOKENIZER_FILE)
        bar.update()

        quantization = None
        if quantizer is not None:  # raises (nothing written) when a gate fails without an override
            step("accuracy gates")
            quantization = quantizer.gate(stage, graphs)
            bar.update()

        model_name = reference.config.name
        # The PyTorch reference has done its work (the fp32 audio tower alone is 2.6 GB at the published
        # size, more than the margin the TensorRT builder leaves on a 24 GB machine).
        del model, reference, quantizer
        gc.collect()

        if target.runtime == "tensorrt":
            step("building TensorRT engines")
            from .tensorrt_build import BuildOptions, build_engines

            config = json.loads((stage / CONFIG_FILE).read_text())
            build_engines(stage, graphs, config, target.name, options.trt or BuildOptions(), **options.trt_limits)
            bar.update()

        step("writing the manifest")
        manifest = build_manifest(stage, target, model_name, graphs, table, options.opset)
        if quantization is not None:
            manifest["quantization"] = quantization
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        output.publish()
        bar.update()
        step(None)
    write(f"fastslm-export: wrote {out} ({target.name}, {_size(out)})")
    write("fastslm-export: seconds per step: " + "; ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return ExportReport(out, manifest, diffs, timings)


def _one_graph(spec: GraphSpec, model, reference, stage: Path, target: Target, options: ExportOptions,
               step, bar, write, quantizer=None) -> tuple[dict, list[OutputDiff]]:  # fmt: skip
    path = stage / spec.file
    if options_streamed(options, model.config):  # traced without weights, filled from the model folder in float
        step(f"exporting {spec.name} (weights streamed)")
        data_file = _stream_float_graph(spec, options.model, model.config, path, target, options)
    else:
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
    precision = quantizer.graph_precision(spec.name) if quantizer else target.precision
    return _graph_entry(spec, path, data_file, precision, options, inputs, outputs, tolerance, diffs, write), diffs


def _graph_entry(spec: GraphSpec, path: Path, data_file: str | None, precision: str, options: ExportOptions,
                 inputs: list, outputs: list, tolerance, diffs: list[OutputDiff], write) -> dict:  # fmt: skip
    """The manifest's entry for one finished graph (and its validation summary, printed)."""
    for name, worst in summarize(diffs).items():
        write(f"{spec.name}: {name:<14} max |ORT - PyTorch| {worst['max_abs_diff']:.2e} (outputs up to "
              f"{worst['reference_max_abs']:.3g})  cosine {worst['min_cosine']:.7f}")  # fmt: skip
    return {
        "file": spec.file,
        "data_file": data_file,
        "precision": precision,
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


def _streamed_graph(spec: GraphSpec, model_dir: Path, config, stage: Path, target: Target, options: ExportOptions,
                    step, bar, write, quantizer=None) -> tuple[dict, list[OutputDiff]]:  # fmt: skip
    """`_one_graph` for the LLM of a model too large to load: traced without weights, filled tensor by tensor."""
    import torch
    from tqdm import tqdm

    from ..models.weights import SafetensorsFolder
    from .streamed import fill_weights, reference_outputs, trace_structure, validate_outputs

    store = SafetensorsFolder(model_dir)
    path = stage / spec.file
    structure = stage / f".{spec.file}.structure"
    step(f"tracing {spec.name} (no weights)")
    weights = trace_structure(spec, config, structure, target.dtype, options.opset, target.runtime == "tensorrt")
    bar.update()
    plan = quantizer.llm_plan() if quantizer else None  # (bits, block size, layers kept float)
    bits, block, keep = plan if plan else (None, INT4_BLOCK, frozenset())
    step(f"writing {spec.name} weights" + (f" (INT{bits})" if bits else ""))
    total = sum(torch.Size(shape).numel() for name, (shape, _) in weights.items() if name != "llm.lm_head.weight")
    with tqdm(total=total * 2, unit="B", unit_scale=True, desc=f"{spec.name} weights", file=sys.stderr,
              disable=_disable(options.progress), leave=False) as weights_bar:  # fmt: skip
        report = fill_weights(structure, path, store, config, weights, bits=bits, block_size=block, keep_float=keep,
                              progress=weights_bar.update)  # fmt: skip
    structure.unlink()
    if quantizer:
        quantizer.record_llm(report.quantized, report.linear)
    bar.update()
    step(f"checking {spec.name}")
    inputs, outputs = check_graph(spec, path, target.float_dtype)
    bar.update()
    step(f"validating {spec.name} against PyTorch (layer by layer" + (f", the graph's INT{bits} weights)" if bits else ")"))
    with tqdm(total=config.qwen3.num_layers, unit="layer", desc="fp32 reference", file=sys.stderr,
              disable=_disable(options.progress), leave=False) as layer_bar:  # fmt: skip
        expected = reference_outputs(store, config, spec, spec.cases, target.float_dtype,
                                     progress=lambda: layer_bar.update(), bits=bits, block_size=block,
                                     keep_float=keep)  # fmt: skip
    if quantizer:
        tolerance, session = quantizer.llm_tolerance(), quantizer.session(path)
    else:
        tolerance, session = spec.tolerances[target.precision], None
    precision = quantizer.graph_precision(spec.name) if quantizer else target.precision
    diffs = validate_outputs(spec, path, expected, tolerance, precision, session)
    bar.update()
    entry = _graph_entry(spec, path, report.data_file, precision, options, inputs, outputs, tolerance, diffs, write)
    if bits:
        entry["validation"]["reference"] = f"PyTorch fp32 computing with the graph's INT{bits} weights (dequantized)"
    return entry, diffs


def options_streamed(options: ExportOptions, config) -> bool:
    """Whether this export streams its weights (see ExportOptions.stream_llm)."""
    return options.stream_llm if options.stream_llm is not None else llm_fp32_bytes(config) > STREAM_LLM_ABOVE


def _stream_float_graph(spec: GraphSpec, model_dir: Path, config, path: Path, target: Target,
                        options: ExportOptions) -> str:  # fmt: skip
    """A graph traced without weights and filled with the model folder's float weights; returns its data file."""
    from ..models.weights import SafetensorsFolder
    from .streamed import fill_weights, trace_structure

    structure = path.with_name(f".{path.name}.structure")
    weights = trace_structure(spec, config, structure, target.dtype, options.opset, target.runtime == "tensorrt")
    report = fill_weights(structure, path, SafetensorsFolder(model_dir), config, weights)
    structure.unlink()
    return report.data_file


def build_manifest(stage: Path, target: Target, model_name: str, graphs: dict, table: dict, opset: int) -> dict:
    """The manifest; `table` is the embedding table's {"dtype", "shape"}."""
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
        "embeddings": {"file": EMBEDDINGS_FILE, "dtype": table["dtype"], "shape": table["shape"]},
        "files": {name: {"sha256": sha256_file(stage / name), "bytes": (stage / name).stat().st_size} for name in files},
    }


def llm_fp32_bytes(config) -> int:
    """Bytes of the LLM's weights in fp32 (a tied head counted once), from its shapes alone."""
    import torch

    with torch.device("meta"):
        from ..models.qwen3 import Qwen3ForCausalLM

        llm = Qwen3ForCausalLM(config.qwen3)
    return 4 * sum(p.numel() for p in llm.parameters())


def _opset(path: Path, exported: int) -> int:
    """The graph's default-domain opset: INT4 weights move a graph from 20 to 21."""
    import onnx

    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return max([o.version for o in opsets if o.domain in ("", "ai.onnx")] or [exported])


@contextlib.contextmanager
def _redrawn_every_second(bar):
    """Redraws the step bar each second: steps without a bar of their own (tracing the published-size
    LLM takes 100 s, validating its audio tower 2 min) still show their time passing."""
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def redraw() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=redraw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _size(folder: Path) -> str:
    n = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
