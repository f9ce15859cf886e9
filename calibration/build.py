"""The calibrated export targets: what `fastslm-export --target onnx-int8|onnx-int4|trt-int8` does
on top of a plain export.

    target      audio tower                         LLM weights                     float graphs
    onnx-int8   INT8 Q/DQ, calibrated (static)      INT8 per channel (weight-only)  fp32
    onnx-int4   INT8 Q/DQ, calibrated (static)      INT4 blocks of 32 (weight-only) fp32
    trt-int8    INT8 Q/DQ, calibrated (static)      INT8 (--llm-bits 4: INT4)       fp16 (+ TensorRT engines)

Per export (`Quantizer`, made by the target for `bundle_writer`):

1. audio tower: calibration windows (a `fastslm-calibrate` folder, or the default audio
   collected now) -> activation ranges (reused from the folder when they were measured on the
   same weights) -> per-layer sensitivity (PyTorch, simulated INT8) -> the most sensitive layers
   stay float until the audio tower reaches `target_cosine` -> Q/DQ graph (qdq.insert_int8_qdq); when an
   audio-tower gate misses in step 3, twice as many of the most sensitive layers stay float and the
   gates run again, until they pass or half the layers are float (`escalate`)
2. LLM: weight-only Q/DQ (qdq.insert_weight_only); the KV cache and the I/O stay float
3. after both graphs and the embedding table are in the staging folder: the accuracy gates
   (gates.run_gates) against the fp32 PyTorch model, printed as a table; a miss stops the
   export before anything is written unless `override_gates`. The manifest's "quantization"
   section records the method, ranges, float layers, sensitivity and the gate table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime.bundle import AUDIO_TOWER, CONFIG_FILE, INT8_WEIGHT_ZERO_POINTS, LLM, TOKENIZER_FILE, Bundle, ModelDims
from ..runtime.errors import OptionError
from ..runtime.onnx_backend import OnnxBackend, session_options
from ..runtime.sampling import MAX_BEAM_SIZE, is_beam_size
from .data import DEFAULT_MAX_WINDOWS, CalibrationSet, collect
from .gates import GateRow, GateThresholds, eval_items, run_gates, unseen_by_calibration
from .qdq import INT4_BLOCK, find_layers, insert_int8_qdq, insert_weight_only, load_graph, save_graph
from .ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS, RANGES_FILE, Ranges, collect_ranges, weights_fingerprint

# Every calibrated target has an INT8 audio tower; its LLM weights take these bits.
LLM_BITS = {"onnx-int8": 8, "onnx-int4": 4, "trt-int8": 8}
LLM_BITS_CHOICE = ("trt-int8",)  # targets whose LLM bits --llm-bits may change

# ONNX Runtime 1.32 fuses DequantizeLinear -> MatMul into MatMulNBits, which on the CPU computes
# with int8 activations (accuracy level 4) by default; for fp16 activations that path returns
# zeros. trt-int8's fp16 graphs are for TensorRT, but they are checked here with ONNX Runtime on
# the CPU: with fp32 accumulation (level 1). fp32 graphs keep the default, as the runtime runs them.
MATMULNBITS_ACCURACY_FP16 = "1"


def check_session(path: Path, fp16: bool) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for checking a quantized graph (see MATMULNBITS_ACCURACY_FP16)."""
    providers = ["CPUExecutionProvider"]
    options = session_options("fp16" if fp16 else "fp32", providers)
    if fp16:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", MATMULNBITS_ACCURACY_FP16)
    return ort.InferenceSession(str(path), options, providers=providers)


class CheckBackend(OnnxBackend):
    """The ONNX Runtime backend over a staging folder, its sessions from `check_session`."""

    def _session(self, graph: str, threads: int | None) -> ort.InferenceSession:
        session = check_session(self.bundle.graph_path(graph), self.bundle.precision == "fp16")
        self._check_io(graph, session)
        return session


# The exporter's own validation (every case of the graph table; the audio tower on calibration
# windows, the LLM on random inputs) is a sanity check here that catches a broken graph; the
# accuracy is what the gates measure on speech. Worst case measured (audio tower: on random mel,
# before it ran on calibration windows) on the tiny model (whose unit-scale LLM amplifies rounding): INT8 audio tower 0.9998,
# INT8 LLM logits 0.9996, INT4 LLM logits 0.95; on the demo model (hidden 256, so blocks of 32
# along K are an eighth of a row) INT4 LLM logits 0.897 on the random "batch 2 chunk" case, while
# its WER gate on speech passes. A broken graph lands far below these bounds.
# Gates whose miss the audio tower's float layers can fix (GateRow.gate starts with one of these).
AUDIO_GATES = ("speech-token cosine", "WER, INT8 audio tower")

VALIDATION_MIN_COSINE = {AUDIO_TOWER: 0.98, (LLM, 8): 0.99, (LLM, 4): 0.8}
STREAMED_LLM_MIN_COSINE = 0.99
STREAMED_LLM_NOTE = ("the LLM was exported streamed, with no fp32 copy in memory to decode with; its graph was "
                     "validated against fp32 PyTorch layer by layer (manifest: graphs.llm.validation)")


@dataclass(frozen=True)
class QuantOptions:
    calibration: Path | None = None  # a fastslm-calibrate folder; None: collect `audio` now
    audio: tuple[Path, ...] | None = None  # recordings (files / folders) when there is no folder; None: the default set
    max_windows: int = DEFAULT_MAX_WINDOWS
    method: str = DEFAULT_METHOD  # activation ranges: minmax, percentile or entropy
    percentile: float = DEFAULT_PERCENTILE
    sensitivity_windows: int = 4  # 0: no sensitivity pass (only keep_float stays float)
    target_cosine: float = 0.999  # the sensitivity pass keeps layers float until the audio tower reaches this
    max_float_layers: int | None = None  # None: at most a quarter of the layers
    keep_float: tuple[str, ...] = ()  # audio-tower layers that stay float regardless
    llm_bits: int | None = None  # None: the target's
    block_size: int = INT4_BLOCK  # INT4 block along K
    llm_keep_float: tuple[str, ...] = ()  # LLM layers (e.g. llm.lm_head) that keep float weights
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    escalate: bool = True  # an audio-tower gate missed: keep more sensitive layers float and gate again
    override_gates: bool = False
    gate_windows: int = 16
    eval_corpus: Path | None = None  # folder of gate.jsonl or eval_seen.jsonl; None: FASTSLM_CORPUS or the shipped eval subset
    wer_items: int = 50
    # 1 (greedy) keeps the gate quick; a bundle decoded with a beam search loses to INT8 at that width,
    # which a greedy gate does not measure (the demo recipe gates at the model's recommended width)
    gate_beam: int = 1
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"--range-method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.llm_bits not in (None, 8, 4):
            raise OptionError(f"--llm-bits must be 8 or 4, got {self.llm_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OptionError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if not is_beam_size(self.gate_beam):
            raise OptionError(f"--gate-beam must be a whole number from 1 (greedy) to {MAX_BEAM_SIZE}, got {self.gate_beam}")
        if not 0.0 < self.target_cosine <= 1.0:
            raise OptionError(f"--target-cosine must be in (0, 1], got {self.target_cosine}")
        for name in ("sensitivity_windows", "gate_windows", "wer_items"):
            if getattr(self, name) < 0:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.calibration is not None:  # ranges of an older format: refused now, not after the float export
            Ranges.load(Path(self.calibration) / RANGES_FILE)


class Quantizer:
    """One calibrated export: rewrites each graph, sets its validation, runs the gates."""

    def __init__(self, target: Any, options: QuantOptions | None, reference: Any,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.target, self.options, self.reference, self.log = target, options or QuantOptions(), reference, log
        bits = LLM_BITS[target.name]
        if self.options.llm_bits is not None and self.options.llm_bits != bits and target.name not in LLM_BITS_CHOICE:
            raise OptionError(f"--llm-bits is fixed by --target {target.name} (INT{bits}); choose the other target instead")
        self.llm_bits = self.options.llm_bits or bits
        self.fp16 = target.float_dtype == "float16"
        self.records: dict[str, dict] = {}
        self._tower: dict | None = None  # the float audio tower and its ranking, for _keep_more_float
        self._calibration: CalibrationSet | None = None
        self.calibration()  # bad calibration input fails now, before any graph is exported

    # ---- what bundle_writer asks ------------------------------------------------------------

    def graph_precision(self, graph: str) -> str:
        return "int8" if graph == AUDIO_TOWER else f"int{self.llm_bits}"

    def calibration_feeds(self, spec: Any, windows: int, seed: int) -> list[np.ndarray]:
        """The audio tower's inputs for a validation case: `windows` real calibration windows.

        A quantized audio tower is calibrated for speech: random mel lies outside its activation ranges
        and false-alarms on a well-trained HFQ-Former (cosine 0.961 on random input while every real
        window scored above 0.99), so the sanity check runs on what it was calibrated for.
        """
        data = self.calibration().windows
        picks = [(seed * windows + k) % len(data) for k in range(windows)]
        if len(spec.inputs) != 1:
            raise ValueError(f"{spec.name}: expected one (mel) input, found {len(spec.inputs)}")
        # The graph's own input type: mel stays fp32 at the graph boundary even in fp16 graphs.
        dtype = spec.inputs[0].dtype
        return [np.stack([data[i] for i in picks]).astype(self.target.float_dtype if dtype == "compute" else dtype)]

    def validate(self, spec: Any, reference: Any, path: Path) -> tuple[Any, list]:
        """The exporter's validation (ORT vs PyTorch fp32) of a quantized graph: the graph table's cases,
        on calibration windows for the audio tower (`calibration_feeds`), random inputs for the LLM.

        As `onnx_export.validate_graph`, with this graph's tolerance and `check_session`'s settings.
        Returns (tolerance, diffs); raises ExportError past the tolerance.
        """
        import torch

        from ..export.graphs import Tolerance
        from ..export.onnx_export import ExportError, OutputDiff, compare, passes, sample_inputs

        cosine = VALIDATION_MIN_COSINE[spec.name if spec.name == AUDIO_TOWER else (LLM, self.llm_bits)]
        tolerance = Tolerance(min_cosine=cosine)
        session = check_session(path, self.fp16)
        names = [t.name for t in spec.outputs]
        diffs = []
        for seed, case in enumerate(spec.cases):
            if spec.name == AUDIO_TOWER:
                feeds = self.calibration_feeds(spec, case.sizes["windows"], seed)
            else:
                feeds = sample_inputs(spec, case.sizes, case.position_offset, self.target.float_dtype, seed=seed + 1)
            with torch.no_grad():
                expected = reference.eval()(*[torch.from_numpy(x.astype(np.float32) if x.dtype == np.float16 else x)
                                              for x in feeds])  # fmt: skip
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            got = session.run(names, {t.name: x for t, x in zip(spec.inputs, feeds)})
            diffs += [OutputDiff(case.name, n, *compare(e.float().numpy(), g)) for n, e, g in zip(names, expected, got)]
        failed = [d for d in diffs if not passes(d, tolerance)]
        if failed:
            d = failed[0]
            raise ExportError(
                f"{spec.name} ({self.graph_precision(spec.name)}) differs from PyTorch on {d.case!r} {d.output}: "
                f"cosine {d.cosine:.5f}, allowed >= {cosine}; the quantized graph is broken: nothing was written"
            )
        return tolerance, diffs

    def post_process(self, path: Path, spec: Any, stage: Path) -> None:
        if spec.name == AUDIO_TOWER:
            self._audio_tower(path, spec)
        elif spec.name == LLM:
            self._llm(path)

    def gate(self, stage: Path, graphs: dict) -> dict:
        """Run the accuracy gates on the finished graphs in `stage`; returns the manifest's "quantization"."""
        from ..models.torch_backend import TorchBackend
        from ..runtime.tokenizer import Tokenizer

        o = self.options
        config = json.loads((stage / CONFIG_FILE).read_text())
        dims = ModelDims.from_config(config, stage / CONFIG_FILE)
        # fp16 graphs open with the fp16 session options (ORT_ENABLE_EXTENDED), as a bundle of that precision would.
        precision = "fp16" if self.fp16 else self.target.precision
        reference = TorchBackend(self.reference)
        tokenizer = Tokenizer.from_file(stage / TOKENIZER_FILE)
        items, why = eval_items(o.eval_corpus, o.wer_items)
        # A streamed LLM (export/streamed.py) has no fp32 copy in memory to decode with: its gates
        # cannot run here, and its graph was held to PyTorch layer by layer instead.
        llm_in_memory = not self.reference.llm.lm_head.weight.is_meta
        if not llm_in_memory:
            items, why = [], STREAMED_LLM_NOTE
        items, seen = unseen_by_calibration(items, self.calibration().sources)
        if seen:
            self.log(f"accuracy gates: {len(seen)} WER item(s) are calibration audio and are not scored "
                     f"(e.g. {seen[0].audio}); calibrate on other audio to score them")
            if not items:
                why = "every WER item is calibration audio"
        fp32_transcripts: dict[str, str] = {}  # the reference's WER transcripts, made once for every round
        while True:
            # The LLM's session opens only if a gate decodes: a streamed LLM's gates do not, and its
            # session (5.6 GB for the published size's INT4 LLM) would sit beside the fp32 audio tower.
            candidate = CheckBackend(Bundle.unpublished(stage, graphs, precision, dims), providers=["CPUExecutionProvider"],
                                     lazy_llm=True)  # fmt: skip
            report = run_gates(
                reference, candidate, tokenizer,
                title=f"accuracy gates: {self.target.name} vs FP32 ({dims.name}"
                      + (f"; WER beam search {o.gate_beam})" if o.gate_beam > 1 else ")"),
                windows=self.calibration().subset(max(1, o.gate_windows)),
                audio_quantized=True, llm_bits=self.llm_bits if llm_in_memory else None, thresholds=o.thresholds,
                items=items, no_wer_reason=why, fp32_transcripts=fp32_transcripts, beam_size=o.gate_beam, log=self.log,
            )  # fmt: skip
            if not (o.escalate and self._keep_more_float(report)):
                break
        if not llm_in_memory:
            report.rows.append(GateRow(f"LLM top-1 agreement, INT{self.llm_bits} weights", "",
                                       f">= {100 * o.thresholds.top1(self.llm_bits):g}%", None,
                                       note=f"skipped: {STREAMED_LLM_NOTE}"))  # fmt: skip
        self.log(report.table())
        report.enforce(o.override_gates)
        if report.failed:
            self.log("fastslm-export: the gates above failed and --override-gates was given: writing the bundle anyway")
        return {**self.records, "gates": report.to_dict(), "gates_overridden": bool(report.failed)}

    def _keep_more_float(self, report: Any) -> bool:
        """After a missed audio-tower gate: rewrite the tower with more of its most sensitive layers
        float (twice as many as now, at least one more) and return True to gate again; False when
        no audio-tower gate failed or the limit (max_float_layers, else half the layers) is reached.

        The sensitivity pass picks the float layers on a few windows by speech-token cosine; the WER
        gate is what decides, so the count grows until the gate passes.
        """
        tower = self._tower
        missed = [r for r in report.failed if r.gate.startswith(AUDIO_GATES)]
        if not missed or tower is None:
            return False
        keep = list(tower["keep"])
        limit = self.options.max_float_layers if self.options.max_float_layers is not None else tower["n_layers"] // 2
        more = [k for k in tower["ranking"] if k not in keep][: max(1, len(keep))]
        more = more[: max(0, limit + len(self.options.keep_float) - len(keep))]
        if not more:
            self.log(f"audio_tower: {missed[0].gate} missed with {len(keep)} layer(s) float, the most allowed")
            return False
        keep += more
        graph = onnx.ModelProto()
        graph.CopyFrom(tower["float_graph"])
        graph, int8 = insert_int8_qdq(graph, tower["amax"], set(keep))
        self._save_audio_tower(graph, tower["path"])
        tower["keep"] = keep
        self.records[AUDIO_TOWER].update(layers_int8=len(int8), keep_float=keep)
        self.records[AUDIO_TOWER].setdefault("escalations", []).append(
            {"missed": missed[0].gate, "measured": missed[0].measured, "float_layers": len(keep)})
        self.log(f"audio_tower: {missed[0].gate} missed ({missed[0].measured}); keeping {len(keep)} layers float "
                 f"(+{', '.join(more)}) and gating again")  # fmt: skip
        return True

    # ---- the graphs -------------------------------------------------------------------------

    def calibration(self) -> CalibrationSet:
        if self._calibration is None:
            o, config = self.options, self.reference.config
            if o.calibration is not None:
                data = CalibrationSet.load(o.calibration)
                self.log(f"calibration: {len(data.windows)} windows from {o.calibration}")
            else:
                data = collect(list(o.audio) if o.audio is not None else None, config.n_mels,
                               max_windows=o.max_windows, progress=o.progress, model={"name": config.name})  # fmt: skip
                self.log(f"calibration: {len(data.windows)} windows from {len(data.sources)} recordings "
                         "(not saved; fastslm-calibrate saves them for repeatable builds)")  # fmt: skip
            data.check_model(config.n_mels, config.name, str(o.calibration or "the calibration audio"))
            self._calibration = data
        return self._calibration

    def _ranges(self, graph: Any, data: CalibrationSet, folder: Path) -> Ranges:
        """The activation ranges; `graph` comes without its weights (they stay in `folder`'s data
        file while ONNX Runtime measures) and has them when this returns."""
        o = self.options
        if o.calibration is not None:
            onnx.load_external_data_for_model(graph, str(folder))
            saved = Ranges.load(Path(o.calibration) / RANGES_FILE)
            if saved is not None and saved.fingerprint == weights_fingerprint(graph) and saved.windows_sha256 == data.sha256:
                self.log(f"calibration: activation ranges from {Path(o.calibration) / RANGES_FILE}")
                return replace(saved, percentile=o.percentile)
            self.log(f"calibration: the ranges in {o.calibration} were measured on other weights; measuring them again")
        return collect_ranges(graph, data.windows, windows_sha256=data.sha256, percentile=o.percentile, progress=o.progress,
                              weights_folder=folder)  # fmt: skip

    def _audio_tower(self, path: Path, spec: Any) -> None:
        from .sensitivity import measure

        o = self.options
        data = self.calibration()
        # Without its weights while ONNX Runtime measures the ranges (it reads them from the file):
        # a published-size audio tower would otherwise be held twice (2.8 GB each) beside the reference.
        graph = onnx.load(str(path), load_external_data=False)
        layers = [layer.key for layer in find_layers(graph)]
        unknown = [k for k in o.keep_float if k not in layers]
        if unknown:
            raise OptionError(f"--keep-float {unknown[0]!r} is not an audio-tower layer; e.g. {', '.join(layers[:3])}")
        ranges = self._ranges(graph, data, path.parent)
        amax = ranges.amax(o.method)
        keep, sensitivity = list(o.keep_float), None
        if o.sensitivity_windows:
            result = measure(spec.wrap(self.reference), amax, data.subset(o.sensitivity_windows),
                             target_cosine=o.target_cosine, max_float=o.max_float_layers, forced_float=o.keep_float,
                             progress=o.progress)  # fmt: skip
            keep, sensitivity = result.keep_float, result.to_dict()
            worst = ", ".join(f"{s.key} {s.cosine:.5f}" for s in result.layers[:3])
            self.log(f"audio_tower: INT8 sensitivity on {result.windows} windows: most sensitive {worst}; all INT8 "
                     f"{result.cosine_all_int8:.5f}; {len(keep)} layer(s) kept float -> {result.cosine_chosen:.5f}")  # fmt: skip
        if o.escalate and sensitivity is not None:  # what _keep_more_float needs to rewrite the tower
            float_graph = onnx.ModelProto()
            float_graph.CopyFrom(graph)
            self._tower = {"path": path, "float_graph": float_graph, "amax": amax, "keep": list(keep),
                           "ranking": [s.key for s in result.layers], "n_layers": len(layers)}
        graph, int8 = insert_int8_qdq(graph, amax, set(keep))
        self._save_audio_tower(graph, path)
        self.log(f"audio_tower: {len(int8)} of {len(layers)} layers INT8 ({o.method} ranges), {len(keep)} float")
        self.records[AUDIO_TOWER] = {
            "precision": "int8",
            "scheme": "Q/DQ: int8 symmetric activations (per tensor) and weights (per output channel, zero "
                      "point 0); float biases; ONNX Runtime CPU computes them with U8U8 kernels",
            INT8_WEIGHT_ZERO_POINTS: True,
            "method": o.method,
            "percentile": o.percentile if o.method == "percentile" else None,
            "calibration": {"folder": str(o.calibration) if o.calibration else None, "windows": len(data.windows),
                            "sha256": data.sha256, "recordings": len(data.sources)},  # fmt: skip
            "layers_int8": len(int8),
            "keep_float": keep,
            "amax": {k: round(v, 6) for k, v in amax.items()},
            "sensitivity": sensitivity,
            "weights_fingerprint": ranges.fingerprint,
        }

    def _save_audio_tower(self, graph: onnx.ModelProto, path: Path) -> None:
        save_graph(graph, path)
        if not self.fp16 and not path.with_name(path.name + ".data").exists():
            # The layers kept float hold most of the file: stored as fp16 where exact and cast back
            # to fp32 once at load (export/fp16_storage.py), the same numbers from about half the bytes.
            from ..export.fp16_storage import store_weights_fp16

            store_weights_fp16(path)

    def _llm(self, path: Path) -> None:
        o = self.options
        graph = load_graph(path)
        layers = [layer.key for layer in find_layers(graph)]
        unknown = [k for k in o.llm_keep_float if k not in layers]
        if unknown:
            raise OptionError(f"--llm-keep-float {unknown[0]!r} is not an LLM layer; e.g. {', '.join(layers[-3:])}")
        graph, quantized = insert_weight_only(graph, self.llm_bits, o.block_size, set(o.llm_keep_float))
        save_graph(graph, path)
        self.record_llm(quantized, layers)

    # ---- an LLM exported streamed (export/streamed.py): quantized while its weights are written

    def llm_plan(self) -> tuple[int, int, frozenset[str]]:
        """(bits, INT4 block size, layers kept float) for a streamed LLM."""
        return self.llm_bits, self.options.block_size, frozenset(self.options.llm_keep_float)

    def llm_tolerance(self) -> Any:
        """A streamed LLM is checked against PyTorch computing with the graph's own quantized weights
        (export/streamed.reference_outputs): only ONNX Runtime's arithmetic differs (MatMulNBits with
        int8 activations), measured 0.99988 on the published-width 1-layer model's logits."""
        from ..export.graphs import Tolerance

        return Tolerance(min_cosine=STREAMED_LLM_MIN_COSINE)

    def session(self, path: Path) -> ort.InferenceSession:
        return check_session(path, self.fp16)

    def record_llm(self, quantized: list[str], layers: list[str]) -> None:
        """Log and record the LLM's quantization; `layers`: the keys of all its weight matrices."""
        o = self.options
        unknown = [k for k in o.llm_keep_float if k not in layers]
        if unknown:
            raise OptionError(f"--llm-keep-float {unknown[0]!r} is not an LLM layer; e.g. {', '.join(layers[-3:])}")
        scheme = "per output channel" if self.llm_bits == 8 else f"blocks of {o.block_size} along K"
        self.log(f"llm: {len(quantized)} of {len(layers)} weight matrices INT{self.llm_bits} ({scheme}), weight-only")
        self.records[LLM] = {
            "precision": f"int{self.llm_bits}",
            "scheme": f"weight-only DequantizeLinear, int{self.llm_bits} symmetric, {scheme}; float activations and KV cache",
            "block_size": o.block_size if self.llm_bits == 4 else None,
            "layers_quantized": len(quantized),
            "keep_float": list(o.llm_keep_float),
        }


def make_quantizer(target: Any, options: QuantOptions | None, reference: Any,
                   log: Callable[[str], None] = print) -> Quantizer:  # fmt: skip
    return Quantizer(target, options, reference, log)

