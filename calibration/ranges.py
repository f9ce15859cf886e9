"""Activation ranges of the audio tower's INT8 layers, from real audio, by three methods.

One ONNX Runtime pass over the calibration windows records a histogram of |x| for every tensor
that feeds a quantizable layer (the graph itself, fp32 or fp16, with those tensors added as
outputs). From the histograms:

    minmax       the largest |x| seen: nothing clips, small values get coarse steps
    percentile   the |x| below which `percentile` % of the values lie (default 99.99): clips outliers
    entropy      TensorRT's calibration: the clipping threshold whose 128-level quantized
                 histogram has the least KL divergence from the original one

Exact zeros are left out of the histograms: symmetric INT8 represents them exactly at any
scale, and the padding of a short recording's window (a 2 s utterance leaves 28 s of zero mel at
the first convolution) would otherwise make percentile and entropy fit the padding, not the speech.

Ranges are symmetric (one amax per layer: TensorRT's explicit INT8 wants zero points of 0) and
keyed by layer (`qdq.Layer.key`, the PyTorch module path). `weights_fingerprint` ties them to
the weights they were measured with: the same for the model's fp32 and fp16 graphs.

ranges.json:  {"format": "fastslm-ranges", "format_version": 2, "fingerprint", "windows_sha256",
               "percentile", "methods": {method: {layer key: amax}},
               "histograms": {layer key: {"width", "amax", "counts"}}}   (exports recompute from these)

Version 2 keys layers by the model's module paths since the audio tower's parts got one name each
(`audio_tower.whisper.*`, `audio_tower.hfq_former.*`; version 1 had `tower.whisper.*`,
`tower.adapter.*`). The fingerprint hashes those keys, so version-1 files are refused with a line
that says to re-run fastslm-calibrate rather than migrated.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data import CalibrationError
from .qdq import Layer, find_layers

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99
RANGES_FILE = "ranges.json"
RANGES_FORMAT = "fastslm-ranges"
RANGES_FORMAT_VERSION = 2
INLINE_GRAPH_LIMIT = 2**31 - 2**26  # bytes: larger graphs reach ORT through a file (protobuf's 2 GB limit)
HIST_BINS = 2048  # bins of |x| (TensorRT's entropy calibration uses 2048)
ENTROPY_LEVELS = 128  # quantized levels of the positive half


@dataclass
class AbsHistogram:
    """Histogram of |x| over [0, width * bins), widened by merging bin pairs when larger values arrive."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))
    width: float = 0.0  # 0 until the first non-zero value
    amax: float = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32).ravel())
        # Exact zeros (the padding of the last window, mostly) are exact in symmetric INT8 at any
        # scale: they say nothing about the range, and would swamp percentile and entropy.
        a = a[np.isfinite(a) & (a > 0)]
        if not a.size:
            return
        top = float(a.max())
        self.amax = max(self.amax, top)
        if self.width == 0.0:
            self.width = top / HIST_BINS * (1 + 1e-6)
        while top >= self.width * HIST_BINS:  # double the range: pairs of bins merge, the upper half is empty
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(HIST_BINS // 2, np.int64)])
            self.width *= 2
        idx = np.minimum((a / self.width).astype(np.int64), HIST_BINS - 1)
        self.counts += np.bincount(idx, minlength=HIST_BINS)

    def threshold(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
        if self.width == 0.0:
            return 0.0
        if method == "minmax":
            return self.amax
        if method == "percentile":
            cdf = np.cumsum(self.counts) / self.counts.sum()
            i = int(np.searchsorted(cdf, percentile / 100.0))
            return min(self.amax, (i + 1) * self.width)
        if method == "entropy":
            return min(self.amax, entropy_threshold(self.counts) * self.width)
        raise CalibrationError(f"unknown range method {method!r}; choose one of {', '.join(METHODS)}")


def entropy_threshold(counts: np.ndarray, levels: int = ENTROPY_LEVELS) -> float:
    """In bins: the clip point i (levels <= i <= len) minimising KL(P_i || Q_i), TensorRT style.

    P_i is the histogram cut at i with everything above folded into its last bin; Q_i is
    counts[:i] merged into `levels` equal groups and spread back evenly over the bins of each
    group that P_i uses.
    """
    counts = counts.astype(np.float64)
    n = len(counts)
    last = int(np.nonzero(counts)[0].max()) + 1 if counts.any() else 0
    if last <= levels:
        return float(max(last, 1))
    best, best_i = np.inf, last
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = counts[i:].sum()
    for i in range(levels, last + 1):
        p = counts[:i].copy()
        if i < n:
            p[-1] += tail[i]
        group = (np.arange(i) * levels) // i
        used = p > 0
        totals = np.bincount(group, weights=counts[:i], minlength=levels)
        users = np.bincount(group, weights=used, minlength=levels)
        q = np.where(used, totals[group] / np.maximum(users[group], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        q = np.where(used & (q == 0), 1e-12, q)  # Q must cover P: a tiny mass instead of infinity
        kl = float(np.sum(p[used] * np.log(p[used] / q[used])))
        if kl < best:
            best, best_i = kl, i
    return float(best_i)


def weights_fingerprint(model: onnx.ModelProto, layers: list[Layer] | None = None) -> str:
    """sha256 over the layers' keys and weights rounded to fp16: equal for a model's fp32 and fp16 graphs."""
    inits = {i.name: i for i in model.graph.initializer}
    digest = hashlib.sha256()
    for layer in layers if layers is not None else find_layers(model):
        digest.update(layer.key.encode())
        digest.update(np.ascontiguousarray(numpy_helper.to_array(inits[layer.weight]).astype(np.float16)).tobytes())
    return digest.hexdigest()


@dataclass
class Ranges:
    fingerprint: str
    windows_sha256: str
    percentile: float
    histograms: dict[str, AbsHistogram]  # by layer key

    def amax(self, method: str) -> dict[str, float]:
        if method not in METHODS:
            raise CalibrationError(f"unknown range method {method!r}; choose one of {', '.join(METHODS)}")
        return {key: float(h.threshold(method, self.percentile)) for key, h in self.histograms.items()}

    def save(self, path: Path) -> None:
        record = {
            "format": RANGES_FORMAT,
            "format_version": RANGES_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "windows_sha256": self.windows_sha256,
            "percentile": self.percentile,
            "methods": {m: self.amax(m) for m in METHODS},
            "histograms": {k: {"width": h.width, "amax": h.amax, "counts": h.counts.tolist()}
                           for k, h in self.histograms.items()},
        }  # fmt: skip
        path.write_text(json.dumps(record) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Ranges | None":
        """The saved ranges, or None when there are none (a damaged file counts as none).

        Ranges of another format version raise CalibrationError: their layer keys are not today's."""
        try:
            record = json.loads(Path(path).read_text())
            if record.get("format") != RANGES_FORMAT:
                return None
            version = record.get("format_version")
            if version != RANGES_FORMAT_VERSION:
                raise CalibrationError(
                    f"{path} is ranges format {version}, keyed by layer names this fastslm no longer uses (it reads "
                    f"format {RANGES_FORMAT_VERSION}); re-run fastslm-calibrate --model MODEL --out {Path(path).parent} --force"
                )
            hists = {k: AbsHistogram(np.asarray(h["counts"], np.int64), float(h["width"]), float(h["amax"]))
                     for k, h in record["histograms"].items()}  # fmt: skip
            return cls(record["fingerprint"], record["windows_sha256"], float(record["percentile"]), hists)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            return None


def _probe_session(model: onnx.ModelProto, layers: list[Layer], workdir: Path, weights_folder: Path | None = None):
    """An ORT session on the graph with every layer's activation added as an output.

    The outputs are added to `model` itself and removed again: a copy of a published-size audio
    tower would be 2.8 GB more. Beyond protobuf's 2 GB the graph goes to ORT through a file, and
    `onnx.save` moves the weights out of `model` into it; they are read back once ORT has loaded them.
    """
    import onnxruntime as ort

    inits = {i.name: i.data_type for i in model.graph.initializer}
    have = {o.name for o in model.graph.output}
    n_outputs = len(model.graph.output)
    for tensor in dict.fromkeys(layer.activation for layer in layers):
        if tensor not in have:
            elem = inits[next(layer.weight for layer in layers if layer.activation == tensor)]
            model.graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
    options = ort.SessionOptions()
    # BASIC: constant folding only. fp16 graphs crash onnxruntime 1.32 at ORT_ENABLE_ALL on CPU.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    try:
        if weights_folder is not None:  # weights not loaded: ORT reads them from the graph's own data file
            path = Path(weights_folder) / f".probe-{os.getpid()}.onnx"
            onnx.save(model, str(path))
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            finally:
                path.unlink()
        # ByteSize() itself fails beyond 2 GB: count the weights' bytes instead.
        if sum(len(t.raw_data) for t in model.graph.initializer) + 2**26 < INLINE_GRAPH_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        path = workdir / "probe.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="probe.onnx.data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        onnx.load_external_data_for_model(model, str(workdir))
        return session
    finally:
        del model.graph.output[n_outputs:]


def collect_ranges(
    model: onnx.ModelProto, windows: np.ndarray, *, windows_sha256: str = "", percentile: float = DEFAULT_PERCENTILE,
    progress: bool | None = None, input_name: str = "mel", weights_folder: Path | None = None,
) -> Ranges:
    """Histograms of every quantizable layer's input over `windows` (one window a run).

    `weights_folder`: `model` was loaded without its external data, which lies there; ONNX Runtime
    reads it from the files, and `model` has its weights loaded when this returns.
    """
    import tempfile

    from tqdm import tqdm

    layers = find_layers(model)
    if not layers:
        raise CalibrationError("the audio-tower graph has no layers with constant weights to quantize; re-export it")
    tensors = list(dict.fromkeys(layer.activation for layer in layers))
    hists = {t: AbsHistogram() for t in tensors}
    with tempfile.TemporaryDirectory(prefix="fastslm-ranges-") as tmp:
        session = _probe_session(model, layers, Path(tmp), weights_folder)
        for w in tqdm(windows, desc="activation ranges", unit="window", file=sys.stderr,
                      disable=None if progress is None else not progress):  # fmt: skip
            outputs = session.run(tensors, {input_name: w[None]})
            for t, x in zip(tensors, outputs):
                hists[t].add(x)
            del outputs
        del session
    if weights_folder is not None:
        onnx.load_external_data_for_model(model, str(weights_folder))
    return Ranges(weights_fingerprint(model, layers), windows_sha256, percentile,
                  {layer.key: hists[layer.activation] for layer in layers})  # fmt: skip
