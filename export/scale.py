"""`python -m fastslm.export.scale`: the measurements behind docs/SCALE.md, one command per row.

    measure --label L [--output PATH] [--weights PATH] -- CMD ...
        run CMD; record its wall time, its own peak RSS (wait4), the size of PATH on disk and the
        ratio of the peak RSS to the fp16 weights' bytes (the model folder at --weights)
    bandwidth
        this machine's memory bandwidth: numpy copies of a 1 GiB buffer, 1 thread and all cores
    runtime --bundle B [--audio jfk.flac] [--prefill 6000] [--decode 32]
        ONNX Runtime on the bundle: load, the audio tower per 30 s window, a prefill of N speech-
        token positions, and decode tokens/s with the bytes of LLM weights read per token set
        against the measured bandwidth
    table
        the recorded rows as the markdown tables of docs/SCALE.md

Every subcommand appends one JSON object per row to --record (default work/scale.jsonl).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..calibration.qdq import INT4_BLOCK
from ..runtime.errors import OptionError, reported_in_one_line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RECORD = Path("work/scale.jsonl")
GB = 1e9


def _record(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The 1-minute load average: on a shared machine it says how much of the CPUs the row had.
    row = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_1min": os.getloadavg()[0],
           "cpus": os.cpu_count(), **row}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    typer.echo(json.dumps(row))


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


class AnonPeak:
    """Peak anonymous RSS (RssAnon) of this process, or of process `pid`, while in the `with` block,
    sampled every 50 ms.

    VmHWM also counts file pages mapped from disk, which the kernel can drop under pressure (the
    TensorRT parser maps the graph's external data): this is the part that must fit in RAM.
    """

    def __init__(self, pid: int | None = None):
        self._status = Path(f"/proc/{pid or 'self'}/status")

    def __enter__(self) -> "AnonPeak":
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            try:
                lines = self._status.read_text().splitlines()
            except OSError:  # the process has ended
                return
            for line in lines:
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            if self._stop.wait(0.05):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def weights_bytes(model: Path) -> int:
    """Bytes of a model folder's safetensors (what `peak RSS / weights` is set against)."""
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def measure(
    ctx: typer.Context,
    label: Annotated[str, typer.Option(help="The row's name, e.g. 'export onnx-int4'.")],
    output: Annotated[Optional[Path], typer.Option(help="What the command writes: its size on disk is recorded.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Model folder whose fp16 weights the peak RSS is set against.")] = None,
    record: Annotated[Path, typer.Option(help="JSON-lines file the row is appended to.")] = RECORD,
) -> None:
    """Run the command after `--` and record its wall time and peak RSS."""
    with reported_in_one_line("scale measure"):
        command = list(ctx.args)
        if not command:
            raise OptionError("give the command to measure after --")
        log = record.with_name(record.stem + f".{label.replace(' ', '_').replace('/', '_')}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            try:
                child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            except OSError as exc:  # no such program, or not executable
                raise OptionError(f"cannot run {command[0]!r} ({exc.strerror or exc}): give a command after --") from None
            with AnonPeak(child.pid) as anonymous:
                _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        # CPU seconds beside the wall time: on a shared machine the wall time says more about the load.
        row = {"label": label, "command": " ".join(command), "exit": code, "wall_s": round(wall, 1),
               "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
               "log": str(log)}  # fmt: skip
        if anonymous.peak:
            row["peak_anonymous_rss_bytes"] = anonymous.peak
        if output is not None and Path(output).exists():
            row["output_bytes"] = disk_bytes(output)
        if weights is not None:
            row["weights_bytes"] = weights_bytes(weights)
            row["peak_rss_over_weights"] = round(row["peak_rss_bytes"] / max(row["weights_bytes"], 1), 3)
        steps = [line for line in log.read_text(errors="replace").splitlines() if "seconds per step" in line]
        if steps:
            row["steps"] = steps[-1].split("seconds per step: ", 1)[1]
        _record(record, row)
        if code != 0:
            raise typer.Exit(code)


@app.command()
def bandwidth(record: Annotated[Path, typer.Option(help="JSON-lines file the row is appended to.")] = RECORD) -> None:
    """Memory bandwidth: numpy copy of 1 GiB (bytes read + written per second), 1 thread and all cores."""
    from ..runtime.bench.stages import memory_bandwidth_gbs

    cores = os.cpu_count() or 1
    one = memory_bandwidth_gbs(1024, threads=1) * GB
    all_cores = memory_bandwidth_gbs(1024, threads=cores) * GB
    _record(record, {"label": "memory bandwidth", "command": "python -m fastslm.export.scale bandwidth",
                     "copy_1_thread_bytes_s": round(one), f"copy_{cores}_threads_bytes_s": round(all_cores),
                     "bandwidth_bytes_s": round(max(one, all_cores))})  # fmt: skip


def llm_weight_bytes(graph: Path) -> dict[str, int]:
    """Bytes of the LLM graph's weights by kind: what one decode step reads (every weight once)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    kinds: dict[str, int] = {}
    for t in model.graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        n = length if length is not None else len(t.raw_data)
        kind = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.INT8: "int8"}.get(t.data_type, "float")
        kinds[kind] = kinds.get(kind, 0) + n
    return kinds


@app.command()
def runtime(
    bundle: Annotated[Path, typer.Option(help="An onnx / onnx-int4 / onnx-int8 bundle.")],
    audio: Annotated[Optional[Path], typer.Option(help="Speech for the audio-tower row [default: $FASTSLM_SHARED_DATA/jfk.flac].")] = None,
    prefill: Annotated[int, typer.Option(help="Positions in the prefill row (6,000 = one hour of audio).")] = 6000,
    decode: Annotated[int, typer.Option(help="Decode steps timed.")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads [default: all cores].")] = None,
    record: Annotated[Path, typer.Option(help="JSON-lines file the rows are appended to.")] = RECORD,
) -> None:
    """Load, audio tower per window, prefill and decode on the CPU, each a row."""
    with reported_in_one_line("scale runtime"):
        from ..calibration.evaluation import shared_data
        from ..runtime.audio import audio_to_windows, load_audio
        from ..runtime.bundle import LLM
        from ..runtime.onnx_backend import OnnxBackend

        if prefill < 1 or decode < 1:
            raise OptionError("--prefill and --decode must be >= 1")
        command = f"python -m fastslm.export.scale runtime --bundle {bundle} --prefill {prefill} --decode {decode}" + (f" --threads {threads}" if threads else "")
        start = time.perf_counter()
        backend = OnnxBackend.from_bundle(bundle, threads=threads, verify=False)
        _record(record, {"label": "load", "command": command, "wall_s": round(time.perf_counter() - start, 1),
                         "peak_rss_bytes": peak_rss_bytes(), "output_bytes": disk_bytes(bundle)})  # fmt: skip

        if audio is None and shared_data() is None:
            raise OptionError("pass --audio with a recording of speech, or set FASTSLM_SHARED_DATA to the folder holding jfk.flac")
        samples = load_audio(audio or shared_data() / "jfk.flac")
        window = audio_to_windows(samples, backend.n_mels)[:1]
        times = []
        for _ in range(2):  # the first run also allocates ORT's buffers
            start = time.perf_counter()
            backend.encode_windows(window)
            times.append(time.perf_counter() - start)
        _record(record, {"label": "audio tower, 1 window (30 s)", "command": command, "wall_s": round(times[-1], 2),
                         "first_run_s": round(times[0], 2), "peak_rss_bytes": peak_rss_bytes()})  # fmt: skip

        rng = np.random.default_rng(0)
        embeds = (rng.standard_normal((prefill, backend.hidden_size)) * 0.02).astype(np.float32)
        start = time.perf_counter()
        logits, cache = backend.decode(embeds, backend.empty_cache())
        wall = time.perf_counter() - start
        _record(record, {"label": f"prefill, {prefill} positions", "command": command, "wall_s": round(wall, 1),
                         "positions_s": round(prefill / wall, 1), "peak_rss_bytes": peak_rss_bytes()})  # fmt: skip

        weights = llm_weight_bytes(backend.bundle.graph_path(LLM))
        per_token = sum(weights.values())
        rate = {}
        bw = _bandwidth_recorded(record)
        for past_label, start_cache in (("short", None), ("after prefill", cache)):
            cache_now = start_cache if start_cache is not None else backend.decode(embeds[:16], backend.empty_cache())[1]
            token = embeds[:1]
            backend.decode(token, cache_now)  # warm-up step
            start = time.perf_counter()
            for _ in range(decode):
                _, cache_now = backend.decode(token, cache_now)
            wall = time.perf_counter() - start
            kv = sum(k.nbytes + v.nbytes for k, v in zip(cache_now.keys, cache_now.values))
            rate[past_label] = decode / wall
            row = {"label": f"decode, context {past_label} ({cache_now.length} positions at the end)", "command": command,
                   "tokens_s": round(decode / wall, 2), "weights_bytes_per_token": per_token,
                   "weights_by_kind": weights, "kv_cache_bytes": kv,
                   "weights_bytes_s": round(per_token * decode / wall), "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
            if bw:
                row["bandwidth_bytes_s"] = bw
                row["weights_bytes_s_over_bandwidth"] = round(per_token * decode / wall / bw, 3)
                row["weights_and_kv_bytes_s_over_bandwidth"] = round((per_token + kv) * decode / wall / bw, 3)
            _record(record, row)


@app.command("llm-decode")
def llm_decode(
    model: Annotated[Path, typer.Option(help="A model folder (e.g. fastslm-convert --random-init published).")],
    workdir: Annotated[Path, typer.Option(help="Folder for the INT4 LLM graph (kept for reruns).")],
    prefill: Annotated[int, typer.Option(help="Positions before the timed decode steps.")] = 64,
    decode: Annotated[int, typer.Option(help="Decode steps timed.")] = 16,
    past: Annotated[int, typer.Option(help="Random cached positions before the prefill: decode at a long context without prefilling it.")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads [default: all cores].")] = None,
    graph_only: Annotated[bool, typer.Option(help="Write the graph (2 GB of RAM) and stop before the timed session (6 GB).")] = False,
    profile: Annotated[bool, typer.Option(help="Also record the timed steps' milliseconds per ONNX Runtime operator type (profiling slows them).")] = False,
    copy_cache: Annotated[bool, typer.Option(help="Feed exact-length past tensors (the graph copies them into present) even where the graph can keep the cache in place.")] = False,
    block_size: Annotated[int, typer.Option(help="INT4 block length along the input dimension (fastslm-export --block-size); used when the graph is written.")] = INT4_BLOCK,
    record: Annotated[Path, typer.Option(help="JSON-lines file the rows are appended to.")] = RECORD,
) -> None:
    """The INT4 LLM graph alone (streamed from the model folder as fastslm-export writes it), then decode on the CPU.

    A graph written before the cache was kept in place (no `past_length` input) is timed as the
    runtime runs it: exact-length past in, present copied out.
    """
    with reported_in_one_line("scale llm-decode"):
        from ..export.graphs import llm_spec
        from ..export.streamed import fill_weights, trace_structure
        from ..export.tensorrt_build import graph_weight_bytes
        from ..models.fastslm import read_config
        from ..models.weights import SafetensorsFolder
        from ..runtime.bundle import kv_input_name, kv_output_name
        from ..runtime.kv_buffers import KVBuffers
        from ..runtime.kv_cache import KVCache
        from ..runtime.onnx_backend import PAST_LENGTH, run_in_place, session_options
        import onnxruntime as ort
        import torch

        if prefill < 1 or decode < 1 or past < 0:
            raise OptionError("--prefill and --decode must be >= 1, --past >= 0")
        config = read_config(model)
        spec = llm_spec(config, in_place_cache=True)
        workdir.mkdir(parents=True, exist_ok=True)
        graph = workdir / spec.file
        command = f"python -m fastslm.export.scale llm-decode --model {model} --workdir {workdir}"
        if not graph.is_file():
            start, cpu = time.perf_counter(), time.process_time()
            weights = trace_structure(spec, config, workdir / "structure.onnx", torch.float32)
            fill_weights(workdir / "structure.onnx", graph, SafetensorsFolder(model), config, weights, bits=4,
                         block_size=block_size)
            _record(record, {"label": "INT4 LLM graph, streamed (trace + fill)", "command": command,
                             "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
                             "peak_rss_bytes": peak_rss_bytes(),
                             "output_bytes": graph_weight_bytes(graph)})  # fmt: skip
        if graph_only:
            return
        start = time.perf_counter()
        options = session_options("int4", ["CPUExecutionProvider"], threads)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(workdir / "ort-profile")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        _record(record, {"label": "load INT4 LLM graph", "command": command, "wall_s": round(time.perf_counter() - start, 1),
                         "peak_rss_bytes": peak_rss_bytes()})  # fmt: skip
        d = config.qwen3
        rng = np.random.default_rng(0)
        names = ["logits"] + [kv_output_name(i, k) for i in range(d.num_layers) for k in ("key", "value")]
        # A decode step's cost depends on the cache's length, not on its values: random ones stand in for a long prefill.
        cache = KVCache(*([(rng.standard_normal((1, d.num_kv_heads, past, d.head_dim)) * 0.5).astype(np.float32)
                           for _ in range(d.num_layers)] for _ in range(2)))  # fmt: skip
        in_place = PAST_LENGTH in {i.name for i in session.get_inputs()}

        def step(embeds: np.ndarray, cache: KVCache) -> KVCache:
            n, start = len(embeds), cache.length
            feeds = {"inputs_embeds": embeds[None], "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
                     "logits_index": np.array([n - 1], np.int64)}  # fmt: skip
            if in_place:
                feeds[PAST_LENGTH] = np.array([start], np.int64)
            if in_place and not copy_cache:
                buffers = KVBuffers.for_step(cache, n, d.max_position_embeddings, d.num_kv_heads, d.head_dim, np.float32)
                return run_in_place(session, feeds, buffers, start + n)[1]
            feeds.update({kv_input_name(i, k): a[i] for i in range(d.num_layers) for k, a in (("key", cache.keys), ("value", cache.values))})
            present = session.run(names, feeds)[1:]
            return KVCache(present[0::2], present[1::2])

        embeds = (rng.standard_normal((prefill + 1, d.hidden_size)) * 0.02).astype(np.float32)
        command += f" --prefill {prefill} --decode {decode}" + (f" --past {past}" if past else "") + (
            f" --threads {threads}" if threads else "") + (" --profile" if profile else "")  # fmt: skip
        command += " --copy-cache" if copy_cache else ""
        what = f"{d.num_layers} layers" + (f", {threads} threads" if threads else "") + (", profiled" if profile else "")
        what += ", cache in place" if in_place and not copy_cache else ", cache copied"
        start = time.perf_counter()
        cache = step(embeds[:prefill], cache)
        _record(record, {"label": f"INT4 LLM prefill, {what}: {prefill} positions after {past}", "command": command,
                         "wall_s": round(time.perf_counter() - start, 1), "peak_rss_bytes": peak_rss_bytes()})  # fmt: skip
        cache = step(embeds[prefill:], cache)  # warm-up step
        start = time.perf_counter()
        for _ in range(decode):
            cache = step(embeds[prefill:], cache)
        wall = time.perf_counter() - start
        weights = llm_weight_bytes(graph)
        per_token = sum(weights.values())
        kv = sum(a.nbytes for a in cache.keys + cache.values)
        row = {"label": f"INT4 LLM decode, {what} ({cache.length} positions at the end)", "command": command,
               "tokens_s": round(decode / wall, 3), "weights_bytes_per_token": per_token, "weights_by_kind": weights,
               "kv_cache_bytes": kv, "weights_bytes_s": round(per_token * decode / wall),
               "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
        bw = _bandwidth_recorded(record)
        if bw:
            row["bandwidth_bytes_s"] = bw
            row["weights_bytes_s_over_bandwidth"] = round(per_token * decode / wall / bw, 3)
            row["weights_and_kv_bytes_s_over_bandwidth"] = round((per_token + kv) * decode / wall / bw, 3)
        if profile:
            row["ms_per_step_by_op"] = _ms_per_step_by_op(Path(session.end_profiling()), decode)
        _record(record, row)


@app.command("trt-llm")
def trt_llm(
    model: Annotated[Path, typer.Option(help="A model folder (e.g. fastslm-convert --random-init published).")],
    workdir: Annotated[Path, typer.Option(help="Folder for the fp16 LLM graph and its engine (the graph is kept for reruns).")],
    graph_only: Annotated[bool, typer.Option(help="Write the fp16 graph and stop before the build.")] = False,
    max_context: Annotated[Optional[int], typer.Option(help="Positions the engine serves [default: the planner's choice].")] = None,
    flavour: Annotated[str, typer.Option(help="TensorRT flavour: auto, tensorrt, tensorrt_rtx.")] = "auto",
    compute_capability: Annotated[Optional[list[str]], typer.Option(help="TensorRT for RTX target, e.g. 8.6 (repeatable) [default: its defaults].")] = None,
    one_llm_profile: Annotated[bool, typer.Option(help="Build the engine with the prefill profile only (fastslm-export --trt-one-llm-profile).")] = False,
    graph_name: Annotated[str, typer.Option("--graph", help="llm, or audio_tower (its engine instead; --workdir then holds audio_tower.onnx).")] = "llm",
    record: Annotated[Path, typer.Option(help="JSON-lines file the rows are appended to.")] = RECORD,
) -> None:
    """The fp16 LLM graph of trt-fp16 (streamed from the model folder as fastslm-export writes it), then its TensorRT engine.

    The graph and the build run in separate invocations when the graph is already there, so the
    build row's peak RSS is the builder's own (plus the interpreter and TensorRT's libraries).
    """
    with reported_in_one_line("scale trt-llm"):
        from ..export.graphs import audio_tower_spec, llm_spec
        from ..export.onnx_export import read_io
        from ..export.streamed import fill_weights, trace_structure
        from ..export.tensorrt_build import BuildOptions, build_engine, graph_weight_bytes
        from ..export.trt_profiles import audio_window_bytes, plan_profiles
        from ..models.fastslm import read_config
        from ..models.weights import SafetensorsFolder
        import torch

        config = read_config(model)
        if graph_name not in ("llm", "audio_tower"):
            raise OptionError(f"--graph must be llm or audio_tower, got {graph_name!r}")
        # The LLM in TensorRT's form: past and new concatenated, no ONNX Runtime op.
        spec = llm_spec(config) if graph_name == "llm" else audio_tower_spec(config)
        layers = config.qwen3.num_layers if graph_name == "llm" else config.whisper.n_layers
        workdir.mkdir(parents=True, exist_ok=True)
        graph = workdir / spec.file
        command = f"python -m fastslm.export.scale trt-llm --model {model} --workdir {workdir}" + (
            f" --graph {graph_name}" if graph_name != "llm" else "")
        if not graph.is_file():
            start, cpu = time.perf_counter(), time.process_time()
            weights = trace_structure(spec, config, workdir / "structure.onnx", torch.float16, fold_constants=True)
            fill_weights(workdir / "structure.onnx", graph, SafetensorsFolder(model), config, weights)
            (workdir / "structure.onnx").unlink()
            _record(record, {"label": f"fp16 {graph_name} graph for TensorRT, {layers} layers, streamed",
                             "command": command + " --graph-only", "wall_s": round(time.perf_counter() - start, 1),
                             "cpu_s": round(time.process_time() - cpu, 1), "peak_rss_bytes": peak_rss_bytes(),
                             "output_bytes": graph_weight_bytes(graph)})  # fmt: skip
            return
        if graph_only:
            return
        q = config.qwen3
        w = config.whisper
        plan = plan_profiles(tokens_per_window=config.tokens_per_window, window_bytes=audio_window_bytes(w.n_ctx, w.width, w.n_heads),
                             max_position_embeddings=q.max_position_embeddings, max_context=max_context,
                             one_llm_profile=one_llm_profile)  # fmt: skip
        inputs, _ = read_io(graph)
        start, cpu = time.perf_counter(), time.process_time()
        with AnonPeak() as anon:
            entry = build_engine(graph, workdir / f"{graph_name}.engine", graph=graph_name,
                                 declared_inputs=[(t["name"], t["shape"]) for t in inputs],
                                 profiles=plan.for_graph(graph_name), options=BuildOptions(
                                 flavour=flavour, progress=False, compute_capabilities=tuple(compute_capability or ())),
                                 precision=("fp16",))  # fmt: skip
        if graph_name == "llm":
            fp16_bytes = 2 * sum(int(np.prod(s)) for name, (s, _) in _llm_parameters(config).items())
        else:  # the graph's external data: its fp16 weights
            fp16_bytes = disk_bytes(graph.with_name(graph.name + ".data"))
        targets = f", compute capability {' '.join(compute_capability)}" if compute_capability else ""
        if graph_name == "llm":
            targets += ", one profile (prefill)" if one_llm_profile else ", profiles prefill + decode"
        _record(record, {"label": f"TensorRT {'+'.join(entry['precisions'])} {graph_name} engine build, {layers} layers{targets}",
                         "command": command + (f" --max-context {max_context}" if max_context else "") + f" --flavour {flavour}"
                         + "".join(f" --compute-capability {c}" for c in compute_capability or ())
                         + (" --one-llm-profile" if one_llm_profile else ""),
                         "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
                         "peak_rss_bytes": peak_rss_bytes(), "output_bytes": entry["bytes"], f"{graph_name}_fp16_weights_bytes": fp16_bytes,
                         f"peak_rss_over_{graph_name}_fp16_weights": round(peak_rss_bytes() / fp16_bytes, 3),
                         "peak_anon_rss_bytes": anon.peak,
                         "max_context": plan.max_context, "build_seconds": entry["build_seconds"]})  # fmt: skip


def _llm_parameters(config) -> dict:
    """{name: (shape, dtype)} of the LLM's parameters, the tied head once (shapes only: no memory)."""
    import torch

    from ..models.qwen3 import Qwen3ForCausalLM

    with torch.device("meta"):
        llm = Qwen3ForCausalLM(config.qwen3)
    return {name: (tuple(p.shape), p.dtype) for name, p in llm.named_parameters()}


def _ms_per_step_by_op(trace: Path, steps: int) -> dict[str, float]:
    """Kernel milliseconds per operator type, averaged over the last `steps` runs of an ONNX Runtime profile."""
    events = json.loads(trace.read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first = runs[-steps]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1000 / steps
    return {op: round(ms, 2) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1]) if ms >= 0.05}


def _bandwidth_recorded(record: Path) -> int | None:
    if not record.is_file():
        return None
    rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    values = [r["bandwidth_bytes_s"] for r in rows if r.get("label") == "memory bandwidth"]
    return values[-1] if values else None


# Vendor specifications (not measured here): memory in GB (Jetson: shared by CPU and GPU) and bandwidth in GB/s.
DEVICES = (
    ("Jetson Orin Nano 8GB", 8, 68, True), ("Jetson Orin Nano 8GB Super", 8, 102, True),
    ("Jetson Orin NX 16GB", 16, 102.4, True), ("Jetson AGX Orin 32GB", 32, 204.8, True),
    ("Jetson AGX Orin 64GB", 64, 204.8, True), ("Jetson AGX Thor 128GB", 128, 273, True),
    ("RTX 4060 8GB", 8, 272, False), ("RTX 4070 12GB", 12, 504, False), ("RTX 4080 16GB", 16, 717, False),
    ("RTX 4090 24GB", 24, 1008, False), ("RTX 5090 32GB", 32, 1792, False),
)  # fmt: skip
SYSTEM_RESERVE_GB = 2.0  # Jetson: what the OS, CUDA context and runtime take of the shared memory (an assumption)
ONE_HOUR_POSITIONS = 6000 + 512 + 64  # 120 windows x 50 speech tokens, a 512-token answer, the prompt text


@app.command()
def project(
    model: Annotated[Path, typer.Option(help="The fp16 model folder (its safetensors give the fp16 weights).")],
    int4_llm: Annotated[Path, typer.Option(help="An INT4 llm.onnx of that model (an onnx-int4 bundle's, or scale llm-decode's).")],
    record: Annotated[Path, typer.Option(help="JSON-lines file the rows are appended to.")] = RECORD,
) -> None:
    """PROJECTION: which device holds which variant with one hour of audio's KV cache (fp16), and its decode bound."""
    with reported_in_one_line("scale project"):
        from ..models.fastslm import read_config
        from ..models.weights import SafetensorsFolder

        q = read_config(model).qwen3
        kv = ONE_HOUR_POSITIONS * 2 * q.num_layers * q.num_kv_heads * q.head_dim * 2  # fp16 keys + values
        fp16 = weights_bytes(model)
        llm_int4 = sum(llm_weight_bytes(int4_llm).values())
        store = SafetensorsFolder(model)
        audio_tower_fp16 = 2 * sum(int(np.prod(store.shape(k))) for k in store.keys() if k.startswith("audio_tower."))
        audio_tower_int8 = audio_tower_fp16 // 2  # one byte a weight (scales and biases left out)
        embed_fp16 = q.vocab_size * q.hidden_size * 2  # the runtime's input table, beside the quantized head
        llm_fp16 = fp16 - audio_tower_fp16  # tied head stored once
        variants = {
            "fp16 (trt-fp16)": (fp16, llm_fp16),
            "INT8 audio tower + INT8 LLM (trt-int8)": (audio_tower_int8 + llm_fp16 // 2 + embed_fp16, llm_fp16 // 2),
            "INT8 audio tower + INT4 LLM (trt-int8 --llm-bits 4)": (audio_tower_int8 + llm_int4 + embed_fp16, llm_int4),
        }
        typer.echo(f"PROJECTION (vendor specs, not measured): one hour of audio = {ONE_HOUR_POSITIONS} positions, "
                   f"fp16 KV cache {kv / GB:.2f} GB; Jetson keeps {SYSTEM_RESERVE_GB:g} GB for the system")  # fmt: skip
        typer.echo("| variant | weights + 1 h KV | " + " | ".join(name for name, *_ in DEVICES) + " |")
        typer.echo("|---|---|" + "---|" * len(DEVICES))
        for label, (total, per_token) in variants.items():
            need = total + kv
            cells = []
            for _, mem, bw, shared in DEVICES:
                room = (mem - (SYSTEM_RESERVE_GB if shared else 0)) * GB
                bound = bw * GB / (per_token + kv)
                cells.append(f"fits, <= {bound:.0f} tok/s" if need <= room else "no")
            typer.echo(f"| {label} | {need / GB:.2f} GB | " + " | ".join(cells) + " |")
            _record(record, {"label": f"projection: {label}", "command": "python -m fastslm.export.scale project",
                             "projection": True, "weights_bytes": total, "kv_1h_bytes": kv,
                             "decode_bytes_per_token_1h": per_token + kv})  # fmt: skip


@app.command()
def table(record: Annotated[Path, typer.Option(help="JSON-lines file of recorded rows.")] = RECORD) -> None:
    """Print the recorded rows as a markdown table (the last row of each label wins)."""
    rows: dict[str, dict] = {}
    for line in record.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["label"]] = r
    typer.echo("| stage | wall | peak RSS | on disk | ratio |")
    typer.echo("|---|---|---|---|---|")
    for r in rows.values():
        wall = f"{r['wall_s']} s" if "wall_s" in r else (f"{r['tokens_s']} tok/s" if "tokens_s" in r else "")
        rss = f"{r['peak_rss_bytes'] / GB:.2f} GB" if "peak_rss_bytes" in r else ""
        disk = f"{r['output_bytes'] / GB:.2f} GB" if "output_bytes" in r else ""
        ratio = ""
        if "peak_rss_over_weights" in r:
            ratio = f"RSS / fp16 weights {r['peak_rss_over_weights']:.2f} (limit 1.5)"
        elif "weights_bytes_s_over_bandwidth" in r:
            ratio = f"weight bytes/s / bandwidth {r['weights_bytes_s_over_bandwidth']:.2f} (limit >= 0.5)"
        elif "bandwidth_bytes_s" in r:
            ratio = f"{r['bandwidth_bytes_s'] / GB:.1f} GB/s"
        typer.echo(f"| {r['label']} | {wall} | {rss} | {disk} | {ratio} |")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
