"""Per-layer INT8 sensitivity of the audio tower, measured, and the layers to keep in float.

The measurement runs the fp32 PyTorch model (on a GPU if there is one) with INT8 simulated exactly as the Q/DQ graph
computes it (activation: symmetric per-tensor with the calibrated amax; weight: symmetric per
output channel; round half to even, clip to [-127, 127]), one layer at a time, on a few
calibration windows: sensitivity = 1 - cosine(speech tokens, fp32 speech tokens). PyTorch
rather than one ONNX Runtime session per variant because the real encoder's graph (2.5 GB in
fp32) cannot be re-serialized a few hundred times; the real quantized graph is then checked by
the accuracy gates.

Then layers are put back to float, most sensitive first, until the all-INT8-but-those audio tower
reaches `target_cosine` (or `max_float` layers are float).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .evaluation import cosine
from .qdq import INT8_MAX


@dataclass(frozen=True)
class LayerSensitivity:
    key: str
    cosine: float  # speech tokens with only this layer in INT8 vs fp32


@dataclass
class SensitivityResult:
    layers: list[LayerSensitivity]  # most sensitive first
    keep_float: list[str]  # chosen to stay float, most sensitive first
    cosine_all_int8: float  # every layer in INT8 (simulated)
    cosine_chosen: float  # with keep_float in float (simulated)
    windows: int

    def to_dict(self) -> dict:
        return {
            "windows": self.windows,
            "cosine_all_int8": round(self.cosine_all_int8, 6),
            "cosine_chosen": round(self.cosine_chosen, 6),
            "keep_float": self.keep_float,
            "most_sensitive": [{"layer": s.key, "cosine": round(s.cosine, 6)} for s in self.layers[:10]],
        }


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per output channel: Linear (out, in) and Conv1d (out, in, k) both keep channels on axis 0."""
    amax = w.detach().abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return scale.view(-1, *([1] * (w.dim() - 1)))


@contextlib.contextmanager
def simulated_int8(wrapper: nn.Module, amax: dict[str, float], keys: set[str] | list[str]):
    """Within the block, the modules named in `keys` compute in simulated INT8."""
    modules = dict(wrapper.named_modules())
    handles, saved = [], []
    try:
        for key in keys:
            module = modules.get(key)
            if not isinstance(module, (nn.Linear, nn.Conv1d)) or key not in amax:
                continue
            scale = torch.tensor(max(float(amax[key]), 1e-8) / INT8_MAX, device=module.weight.device)
            handles.append(module.register_forward_pre_hook(lambda _m, args, s=scale: (fake_quant(args[0], s), *args[1:])))
            saved.append((module, module.weight.data))
            module.weight.data = fake_quant(module.weight.data, _weight_scale(module.weight.data))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, data in saved:
            module.weight.data = data


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over windows of the cosine of the flattened speech tokens."""
    return float(np.mean([cosine(x, y) for x, y in zip(a, b)]))


def measure(
    wrapper: nn.Module, amax: dict[str, float], windows: np.ndarray, *, target_cosine: float = 0.999,
    max_float: int | None = None, forced_float: tuple[str, ...] = (), progress: bool | None = None,
) -> SensitivityResult:
    """Rank the layers in `amax` by measured sensitivity and choose which stay float.

    `wrapper` is the audio-tower graph module (`graphs.AudioTowerGraph` of the fp32 model), whose
    module paths are the layer keys; `forced_float` layers stay float whatever they measure.
    """
    keys = [k for k, m in wrapper.named_modules() if k in amax and isinstance(m, (nn.Linear, nn.Conv1d))]
    # On a GPU when there is one: the pass runs the audio tower (layers + 2) times, ~230 layers for large-v3.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = next(wrapper.parameters()).device
    mel = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(device)

    @torch.inference_mode()
    def run(int8: list[str]) -> np.ndarray:
        with simulated_int8(wrapper, amax, int8):
            return wrapper.eval()(mel).float().cpu().numpy()

    wrapper.to(device)
    try:
        return _rank_and_choose(run, keys, amax, target_cosine, max_float, forced_float, progress, len(windows))
    finally:
        wrapper.to(home)


def _rank_and_choose(run, keys: list[str], amax: dict[str, float], target_cosine: float, max_float: int | None,
                     forced_float: tuple[str, ...], progress: bool | None, windows: int) -> SensitivityResult:  # fmt: skip
    from tqdm import tqdm

    reference = run([])
    layers = []
    for key in tqdm(keys, desc="INT8 sensitivity", unit="layer", file=sys.stderr,
                    disable=None if progress is None else not progress):  # fmt: skip
        layers.append(LayerSensitivity(key, _mean_cosine(run([key]), reference)))
    layers.sort(key=lambda s: s.cosine)
    keep = [k for k in forced_float if k in amax]
    all_int8 = _mean_cosine(run(keys), reference)
    chosen = _mean_cosine(run([k for k in keys if k not in keep]), reference) if keep else all_int8
    limit = len(keys) // 4 if max_float is None else max_float  # at most a quarter of the layers by default
    for s in layers:
        if chosen >= target_cosine or len(keep) >= limit + len(forced_float):
            break
        if s.key in keep:
            continue
        keep.append(s.key)
        chosen = _mean_cosine(run([k for k in keys if k not in keep]), reference)
    return SensitivityResult(layers, keep, all_int8, chosen, windows)
