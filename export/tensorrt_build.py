"""Build TensorRT engines from a bundle's ONNX graphs, for either TensorRT flavour.

    onnx (+ external data) -> OnnxParser -> strongly typed network -> named optimization
    profiles (trt_profiles) -> build_serialized_network -> <graph>.engine + engines.json

One code path serves full TensorRT (`tensorrt`, >= 10) and TensorRT for RTX (`tensorrt_rtx`):
both parse ONNX into a strongly typed network, so the precision is the graph's own: an fp16
graph gives an fp16 engine, a Q/DQ graph (the calibration work's explicit INT8, or INT4
block-quantized weights) a quantized one. Neither precision builder flags nor implicit
calibrators are used; TensorRT for RTX has none and TensorRT 11 removed them.

The flavours differ in where they build: full TensorRT builds on the GPU that will run the
engine; TensorRT for RTX compiles ahead of time on any machine, GPU or not, for a set of target
compute capabilities, and specialises the engine for the user's GPU when it is loaded. Its
timing cache calls are no-ops (its runtime cache, used by the backend, replaces them).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

from ..runtime.errors import FastSLMError, OptionError
from ..runtime.trt_compat import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    ENGINE_MANIFEST_FILE,
    FLAVOUR_NAMES,
    current_device,
    format_cc,
    import_tensorrt,
    make_logger,
    parse_cc,
    rtx_runs_on,
    rtx_unsupported_message,
)
from .trt_profiles import Profile, ProfilePlan, audio_window_bytes, llm_profile_count, plan_profiles

# What each target needs the graphs to compute in (any one of): fp16 activations, or quantized
# weights / activations from the calibration work (INT8 Q/DQ, INT4 block-quantized weights).
TARGETS = {"trt-fp16": ("fp16",), "trt-int8": ("int8", "int4")}
ENGINE_GRAPHS = ("audio_tower", "llm")  # runtime.bundle.AUDIO_TOWER, LLM


class EngineBuildError(FastSLMError):
    """TensorRT could not build an engine (the graph or the options are at fault)."""


class OnnxParseError(EngineBuildError):
    """TensorRT's ONNX parser rejected a graph."""


@dataclass(frozen=True)
class BuildOptions:
    """What trtexec users expect to set; None leaves TensorRT's default."""

    flavour: str = "auto"  # "auto" (full TensorRT if installed, else TensorRT for RTX), "tensorrt", "tensorrt_rtx"
    workspace_mib: int | None = None  # scratch memory a layer may use (MemoryPoolType.WORKSPACE)
    tactic_dram_mib: int | None = None  # device memory the builder may use for tactics (TACTIC_DRAM)
    optimization_level: int | None = None  # 0 (fast build) .. 5 (slowest build, fastest engine); TensorRT's default 3
    timing_cache: Path | None = None  # loaded if present, saved after the build (full TensorRT only)
    compute_capabilities: tuple[str, ...] = ()  # TensorRT for RTX targets, e.g. ("8.6", "12.0"); () = its defaults
    weight_streaming: bool = False  # let the runtime stream weights under a device-memory budget
    progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise OptionError(f"--trt-opt-level must be 0..5, got {self.optimization_level}")
        for name, option in (("workspace_mib", "--trt-workspace"), ("tactic_dram_mib", "--trt-tactic-memory")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise OptionError(f"{option} must be a positive number of MiB, got {value}")


# ---------------------------------------------------------------------------------------------
# The progress display


def _make_progress(trt: ModuleType, label: str, enabled: bool) -> Any:
    """An IProgressMonitor drawing one tqdm bar over TensorRT's top-level build phase."""
    from tqdm import tqdm

    bar = tqdm(desc=label, total=None, disable=not enabled, leave=True, unit="step", file=sys.stderr)
    if not hasattr(trt, "IProgressMonitor"):  # TensorRT < 10: a spinner that only shows time passing
        return _Spinner(bar)

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.root: str | None = None
            self.phases: list[tuple[str, str | None, int]] = []

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.phases.append((phase_name, parent_phase, num_steps))
                if parent_phase is None and self.root is None:
                    self.root = phase_name
                    bar.reset(total=num_steps)
                bar.set_postfix_str(phase_name, refresh=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                if phase_name == self.root:
                    bar.update(1)
            return True

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                if phase_name == self.root:
                    bar.n = bar.total or bar.n  # TensorRT does not always report the last step
                    bar.set_postfix_str("done", refresh=True)

        def close(self) -> None:
            bar.close()

    return Monitor()


class _Spinner:
    def __init__(self, bar: Any) -> None:
        self.bar, self.phases = bar, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# Parsing and inspecting a network


def _one_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("[checkMacros") and not ln.startswith("Invalid Node")] or lines
    line = re.sub(r"\s+", " ", " ".join(lines))
    line = re.sub(r" In \w+ at /\S+\)", ")", line)  # source locations of TensorRT's own files
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_onnx(trt: ModuleType, builder: Any, logger: Any, path: Path) -> tuple[Any, Any]:
    """A strongly typed network from an ONNX file (external data is read from beside it).

    Returns (network, parser): keep the parser alive until the build is done, it owns the weights.
    """
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not path.is_file():
        raise OnnxParseError(f"ONNX graph {path} does not exist; export the bundle again")
    _refuse_onnx_runtime_ops(path)
    if not parser.parse_from_file(str(path)):
        problems = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f"{err.node_operator()} node {err.node_name()!r}" if err.node_name() else "graph"
            problems.append(f"{where}: {_one_line(err.desc())}")
        if not problems:
            problems = [_one_line(m) for m in logger.errors[-3:]] or ["no reason given"]
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise OnnxParseError(
            f"TensorRT cannot parse {path.name}: {'; '.join(problems[:3])}{more}; re-export the graph "
            "(for INT8 use symmetric Q/DQ without quantized biases)"
        )
    return network, parser


def _refuse_onnx_runtime_ops(path: Path) -> None:
    """ONNX Runtime bundles' LLM graphs compute attention with ONNX Runtime's own op (the KV cache
    kept in place, export/graphs.py), which TensorRT has no importer for: say which export to use."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(node.domain == "com.microsoft" for node in graph.node):
        raise OnnxParseError(
            f"{path.name} is an ONNX Runtime graph (its attention is ONNX Runtime's GroupQueryAttention); "
            "export the model with --target trt-fp16 or trt-int8 for TensorRT"
        )


def _dtype_name(dtype: Any) -> str:
    return {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
            "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "fp8", "INT4": "int4", "FP4": "fp4"}.get(
        dtype.name, dtype.name.lower())


def network_io(network: Any) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a parsed network: name, dtype, shape (-1 = dynamic)."""
    def describe(t: Any) -> dict:
        return {"name": t.name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    return ([describe(network.get_input(i)) for i in range(network.num_inputs)],
            [describe(network.get_output(i)) for i in range(network.num_outputs)])


_PRECISION_LABEL = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4",
                    "fp8": "fp8", "fp4": "fp4"}


def network_precisions(trt: ModuleType, network: Any) -> list[str]:
    """The arithmetic of the network's matrix multiplies and convolutions, and what it dequantizes.

    An fp16 graph gives ["fp16"]; explicit INT8 Q/DQ in an fp16 graph ["fp16", "int8"];
    INT4 block-quantized weights ["fp16", "int4"].
    """
    found = set()
    compute = {trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.CONVOLUTION}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in compute or layer.type == trt.LayerType.DEQUANTIZE:
            tensor = layer.get_input(0)
            if tensor is not None:
                label = _PRECISION_LABEL.get(_dtype_name(tensor.dtype))
                if label:
                    found.add(label)
    order = list(_PRECISION_LABEL.values())
    return sorted(found, key=order.index)


def check_declared_inputs(graph: str, network_inputs: list[dict], declared: Sequence[tuple[str, Sequence]]) -> None:
    """The ONNX graph must have the inputs the bundle manifest declares, dynamic exactly where symbolic."""
    have = {t["name"]: t["shape"] for t in network_inputs}
    want = {name: list(shape) for name, shape in declared}
    if set(have) != set(want):
        raise EngineBuildError(
            f"{graph}: the ONNX graph's inputs {sorted(have)} differ from the manifest's {sorted(want)}; "
            "the bundle mixes files: export it again"
        )
    for name, shape in want.items():
        got = have[name]
        ok = len(got) == len(shape) and all((g == -1) if isinstance(s, str) else (g == s) for g, s in zip(got, shape))
        if not ok:
            raise EngineBuildError(
                f"{graph}: input {name} is shaped {got} in the ONNX graph but {shape} in the manifest; export the bundle again"
            )


# ---------------------------------------------------------------------------------------------
# Building one engine


def _sha256(path: Path) -> str:
    from ..runtime.bundle import sha256_file

    return sha256_file(path)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _build_to_file(trt: ModuleType, builder: Any, network: Any, config: Any, path: Path) -> tuple[bool, OSError | None]:
    """Build and serialize the engine into `path`: (built, the file's write error if any).

    Where the builder takes a stream writer (TensorRT for RTX, recent TensorRT 10), the engine goes
    to the file without one more host buffer the size of the engine (docs/SCALE.md has the peak
    RSS it saves); older releases return that buffer, which is written here.
    """
    if not (hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter")):
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            return False, None
        try:
            path.write_bytes(memoryview(serialized))
        except OSError as exc:
            return False, exc
        return True, None

    class FileWriter(trt.IStreamWriter):
        def __init__(self, file: Any) -> None:
            trt.IStreamWriter.__init__(self)
            self.file, self.error = file, None

        def write(self, data: Any) -> int:
            view, done = memoryview(data), 0
            try:
                while done < len(view):  # one write() moves at most 2 GiB on Linux
                    wrote = self.file.write(view[done:])
                    if not wrote:
                        break
                    done += wrote
            except OSError as exc:
                self.error = exc
            return done  # a short count makes TensorRT stop the build

    with open(path, "wb", buffering=0) as file:  # unbuffered: a full disk fails the write it happens in
        writer = FileWriter(file)
        built = builder.build_serialized_network_to_stream(network, config, writer)
    return bool(built) and writer.error is None, writer.error


def _configure(trt: ModuleType, flavour: str, builder: Any, options: BuildOptions) -> tuple[Any, Any]:
    config = builder.create_builder_config()
    mib = 1 << 20
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib * mib)
    if options.tactic_dram_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, options.tactic_dram_mib * mib)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.compute_capabilities:
        if flavour != "tensorrt_rtx":
            raise OptionError(
                "--trt-compute-capability is for TensorRT for RTX; full TensorRT builds for the GPU it runs on"
            )
        config.num_compute_capabilities = len(options.compute_capabilities)
        for i, text in enumerate(options.compute_capabilities):
            if text.lower() == "current":
                value = trt.ComputeCapability.CURRENT
            else:
                major, minor = parse_cc(text)
                value = trt.ComputeCapability.__members__.get(f"SM{major}{minor}")
                if value is None:
                    known = sorted(k for k in trt.ComputeCapability.__members__ if k.startswith("SM"))
                    raise OptionError(
                        f"TensorRT for RTX {trt.__version__} cannot target compute capability {text}; "
                        f"it knows {', '.join(format_cc(parse_cc(k)) for k in known)}"
                    )
            config.set_compute_capability(value, i)
    cache = None
    if options.timing_cache and flavour == "tensorrt":
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    return config, cache


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    graph: str,
    declared_inputs: Sequence[tuple[str, Sequence[int | str]]],
    profiles: Sequence[Profile],
    options: BuildOptions = BuildOptions(),
    precision: Sequence[str] = (),
) -> dict[str, Any]:
    """Build one engine; returns its engines.json entry.

    `declared_inputs` are the graph's inputs as the bundle manifest declares them (str = a
    symbolic dim named in the profiles). `precision` lists what the target accepts (("fp16",),
    ("int8", "int4")); the network must compute in one of them, or the build stops before it starts.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt, flavour = import_tensorrt(options.flavour)
    logger = make_logger(trt, options.verbose)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError(f"{FLAVOUR_NAMES[flavour]} could not start its builder: {_one_line(' '.join(logger.errors))}")
    network, parser = parse_onnx(trt, builder, logger, onnx_path)
    inputs, outputs = network_io(network)
    check_declared_inputs(graph, inputs, declared_inputs)
    precisions = network_precisions(trt, network)
    if precision and not set(precision) & set(precisions):
        raise OptionError(
            f"{graph}: the target needs {' or '.join(precision)} but {onnx_path.name} computes in "
            f"{', '.join(precisions) or 'nothing'}; export the graphs in {precision[0]} first"
        )

    config, cache = _configure(trt, flavour, builder, options)
    profile_records = []
    for profile in profiles:
        shapes = profile.shapes(declared_inputs)
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(trt_profile) < 0:
            raise EngineBuildError(f"{graph}: TensorRT rejected profile {profile.name!r} ({_one_line(' '.join(logger.errors))})")
        record = profile.to_dict(declared_inputs)
        # What TensorRT holds now, not what we asked: the tests compare the two.
        record["tensorrt_shapes"] = {n: [list(d) for d in trt_profile.get_shape(n)] for n in shapes}
        profile_records.append(record)

    monitor = _make_progress(trt, f"TensorRT {graph}", options.progress)
    if hasattr(config, "progress_monitor") and not isinstance(monitor, _Spinner):
        config.progress_monitor = monitor
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    partial = engine_path.with_name(engine_path.name + ".partial")
    start = time.perf_counter()
    try:
        built, write_error = _build_to_file(trt, builder, network, config, partial)
    except BaseException:  # interrupted: no half-written engine stays behind
        partial.unlink(missing_ok=True)
        raise
    finally:
        monitor.close()
    seconds = time.perf_counter() - start
    del parser  # the network's weights may be freed now
    if not built:
        partial.unlink(missing_ok=True)
        if write_error is not None:
            raise EngineBuildError(f"could not write the {graph} engine to {engine_path.parent}: {write_error}; free some disk space")
        reason = "; ".join(_one_line(m) for m in logger.errors[-2:]) or "no reason given"
        raise EngineBuildError(
            f"{FLAVOUR_NAMES[flavour]} {trt.__version__} could not build the {graph} engine from {onnx_path.name}: {reason}; "
            "try a larger --trt-workspace, or re-export the graph"
        )
    os.replace(partial, engine_path)
    if cache is not None and options.timing_cache:
        _write_atomic(options.timing_cache, memoryview(cache.serialize()))

    data_file = onnx_path.with_name(onnx_path.name + ".data")
    return {
        "file": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "sha256": _sha256(engine_path),
        "onnx": {
            "file": onnx_path.name,
            "sha256": _sha256(onnx_path),
            "data_file": data_file.name if data_file.is_file() else None,
            "data_sha256": _sha256(data_file) if data_file.is_file() else None,
        },
        "precisions": precisions,
        "inputs": inputs,
        "outputs": outputs,
        "profiles": profile_records,
        "build_seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------------------------------------
# The engine manifest and whole bundles


def graph_weight_bytes(path: Path) -> int:
    """A graph's bytes on disk with its external data: about what the builder holds weights for."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def available_host_memory() -> int | None:
    """The kernel's MemAvailable, in bytes; None where there is no /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_record(flavour: str, options: BuildOptions) -> dict[str, Any]:
    """Where the engines can run: the build GPU (full TensorRT) or the AOT targets (TensorRT for RTX)."""
    device = current_device()
    if flavour == "tensorrt_rtx":
        current = [c for c in options.compute_capabilities if c.lower() == "current"]
        targets = [format_cc(parse_cc(c)) for c in options.compute_capabilities if c.lower() != "current"]
        if current:
            if device is None:
                raise OptionError("--trt-compute-capability current needs a visible CUDA GPU; name the targets instead")
            if not rtx_runs_on(device.cc):
                raise OptionError(rtx_unsupported_message(device))
            targets.append(device.compute_capability)
        return {
            "aot": True,
            "specialised_at_load": True,
            "target_compute_capabilities": targets or "default",
            "gpu_name": device.name if current else None,
            "compute_capability": device.compute_capability if current else None,
        }
    if device is None:
        raise EngineBuildError("full TensorRT builds engines on the GPU that runs them, and no CUDA GPU is visible; "
                               "build on the target device, or install TensorRT for RTX (pip install 'fastslm[trt]')")
    return {
        "aot": False,
        "specialised_at_load": False,
        "target_compute_capabilities": [device.compute_capability],
        "gpu_name": device.name,
        "compute_capability": device.compute_capability,
    }


def engine_manifest(
    target: str, options: BuildOptions, plan: ProfilePlan, engines: dict[str, dict], device: dict[str, Any]
) -> dict[str, Any]:
    trt, flavour = import_tensorrt(options.flavour)
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "target": target,
        "tensorrt": {"flavour": flavour, "version": trt.__version__},
        "device": device,
        "builder": {
            "optimization_level": options.optimization_level,
            "workspace_mib": options.workspace_mib,
            "tactic_dram_mib": options.tactic_dram_mib,
            "timing_cache": str(options.timing_cache) if options.timing_cache and flavour == "tensorrt" else None,
            "weight_streaming": options.weight_streaming,
        },
        "limits": {
            "max_windows": plan.max_windows,
            "max_windows_source": plan.max_windows_source,
            "max_context": plan.max_context,
            "prefill_chunk": plan.prefill_chunk,
            "llm_profiles": [p.name for p in plan.for_graph("llm")],
        },
        "engines": engines,
    }


def write_engine_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / ENGINE_MANIFEST_FILE
    _write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def build_engines(
    folder: str | Path,
    graphs: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    target: str = "trt-fp16",
    options: BuildOptions = BuildOptions(),
    *,
    max_windows: int | None = None,
    max_context: int | None = None,
    prefill_chunk: int | None = None,
    one_llm_profile: bool | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build audio_tower.engine and llm.engine from the ONNX graphs in `folder`; write engines.json.

    `graphs` are the bundle manifest's graph entries ("file", "inputs" with symbolic shapes),
    `config` the model's config.json. The engines and engines.json go into `out_dir` (default
    `folder`), so an exporter can build them in its staging folder before it hashes the files.
    """
    if target not in TARGETS:
        raise OptionError(f"unknown TensorRT target {target!r}; choose {', '.join(TARGETS)}")
    folder = Path(folder)
    try:
        whisper, qwen3 = config["whisper"], config["qwen3"]
        window_bytes = audio_window_bytes(int(whisper["n_ctx"]), int(whisper["width"]), int(whisper["n_heads"]))
        tokens_per_window = int(config["hfq_former"]["n_queries"])
        positions = int(qwen3["max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineBuildError(f"config.json lacks or garbles {exc}; re-export the bundle") from None
    _, flavour = import_tensorrt(options.flavour)
    device = device_record(flavour, options)
    gpu = current_device()
    if one_llm_profile is None and "llm" in graphs:
        count, why = llm_profile_count(graph_weight_bytes(folder / graphs["llm"]["file"]), available_host_memory())
        one_llm_profile = count == 1
        if one_llm_profile:
            print(f"TensorRT: the LLM engine gets one profile for prefill and decode ({why})", file=sys.stderr)
    plan = plan_profiles(
        tokens_per_window=tokens_per_window,
        window_bytes=window_bytes,
        max_position_embeddings=positions,
        max_windows=max_windows,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        device_memory=gpu.total_memory if gpu else None,
        device_name=gpu.name if gpu else None,
        one_llm_profile=bool(one_llm_profile),
    )
    if plan.max_context_source != "option":
        print(f"TensorRT: the LLM engine serves {plan.max_context} positions ({plan.max_context_source})", file=sys.stderr)
    out = Path(out_dir) if out_dir is not None else folder
    engines = {}
    for graph in ENGINE_GRAPHS:
        if graph not in graphs:
            raise EngineBuildError(f"{folder} has no {graph} graph; export the bundle again")
        entry = graphs[graph]
        engines[graph] = build_engine(
            folder / entry["file"],
            out / f"{graph}.engine",
            graph=graph,
            declared_inputs=[(t["name"], t["shape"]) for t in entry["inputs"]],
            profiles=plan.for_graph(graph),
            options=options,
            precision=TARGETS[target],
        )
    manifest = engine_manifest(target, options, plan, engines, device)
    write_engine_manifest(out, manifest)
    return manifest


def build_bundle_engines(bundle_path: str | Path, target: str = "trt-fp16", options: BuildOptions = BuildOptions(),
                         **limits: Any) -> dict[str, Any]:
    """Build the engines for an ONNX bundle already on disk (see build_engines for `limits`)."""
    from ..runtime.bundle import CONFIG_FILE, load_bundle

    bundle = load_bundle(bundle_path, verify=False)
    config = json.loads((bundle.path / CONFIG_FILE).read_text())
    return build_engines(bundle.path, bundle.manifest["graphs"], config, target, options, **limits)
