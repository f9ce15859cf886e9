"""Merge LoRA adapters into plain weights: W' = W + (alpha / r) * B @ A.

The reference FastSLM checkpoint holds the LLM under PEFT naming:
`llm.base_model.model.model.layers.N.self_attn.q_proj.base_layer.weight` (out, in),
`...q_proj.lora_A.default.weight` (r, in), `...q_proj.lora_B.default.weight` (out, r), and
plain keys for everything LoRA does not touch. A PEFT adapter file names them without the
adapter (`...q_proj.lora_A.weight`); both forms are read. The merge is computed in float32
and cast back to the base weight's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ..runtime.errors import ModelFileError

PEFT_PREFIX = "llm.base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_BASE_LAYER = ".base_layer."


def merge_lora_pair(base_weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, name: str = "weight") -> Tensor:
    """base (out, in) + scale * B (out, r) @ A (r, in), in float32, returned in base's dtype."""
    out_features, in_features = base_weight.shape
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != in_features or lora_b.shape != (out_features, lora_a.shape[0]):
        raise ModelFileError(f"LoRA shapes of {name} disagree: base {list(base_weight.shape)}, A {list(lora_a.shape)}, "
                             f"B {list(lora_b.shape)}; the adapter is for another model")
    merged = base_weight.float() + scale * (lora_b.float() @ lora_a.float())
    return merged.to(base_weight.dtype)


def _lora_pairs(state: Mapping[str, Tensor], prefix: str, r: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name without prefix: (A, B)} for every LoRA key under prefix, checked to pair up."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix) or ".lora_" not in key:
            continue
        match = _LORA_KEY.match(key[len(prefix):])
        if match is None:
            raise ModelFileError(f"unsupported LoRA key {key} (only lora_A / lora_B weights merge); "
                                 "the checkpoint uses a PEFT variant fastslm does not read")
        module, which = match["module"], match["which"]
        if which in halves.setdefault(module, {}):
            raise ModelFileError(f"{prefix}{module} has two lora_{which} weights (several adapters?); keep one adapter")
        halves[module][which] = tensor
    pairs = {}
    for module, half in halves.items():
        if "A" not in half or "B" not in half:
            have, lacks = ("A", "B") if "A" in half else ("B", "A")
            raise ModelFileError(f"{prefix}{module} has lora_{have} but no lora_{lacks}; the checkpoint is incomplete")
        if half["A"].shape[0] != r:
            raise ModelFileError(f"{prefix}{module}.lora_A has rank {half['A'].shape[0]} but r={r} was given; "
                                 "pass the adapter's r and alpha")
        pairs[module] = (half["A"], half["B"])
    return pairs


def merge_peft_state_dict(state_dict: Mapping[str, Tensor], prefix: str = PEFT_PREFIX, alpha: float = 64,
                          r: int = 16) -> dict[str, Tensor]:
    """The LLM keys of a PEFT-named checkpoint as plain Hugging Face keys, LoRA merged.

    Keys outside `prefix` (the audio encoder, ...) are left out of the result.
    """
    pairs = _lora_pairs(state_dict, prefix, r)
    merged: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix) or ".lora_" in key:
            continue
        name = key[len(prefix):]
        if _BASE_LAYER not in name:
            merged[name] = tensor
            continue
        module, _, param = name.rpartition(_BASE_LAYER)
        plain = f"{module}.{param}"
        if param == "weight":
            if module not in pairs:
                raise ModelFileError(f"{key} has no lora_A / lora_B beside it; the checkpoint is incomplete")
            a, b = pairs.pop(module)
            tensor = merge_lora_pair(tensor, a, b, alpha / r, name=key)
        merged[plain] = tensor
    if pairs:
        module = sorted(pairs)[0]
        raise ModelFileError(f"LoRA weights {prefix}{module}.lora_A/B have no base_layer.weight; the checkpoint is incomplete")
    return merged


def merge_lora_into(model_state: Mapping[str, Tensor], lora_state: Mapping[str, Tensor], prefix: str = PEFT_PREFIX,
                    alpha: float = 64, r: int = 16) -> dict[str, Tensor]:
    """A copy of `model_state` (plain HF names) with the LoRA pairs of `lora_state` merged in.

    `lora_state` holds LoRA keys only under `prefix` (other keys, e.g. an adapter's, are ignored).
    """
    merged = dict(model_state)
    for module, (a, b) in _lora_pairs(lora_state, prefix, r).items():
        target = f"{module}.weight"
        if target not in merged:
            raise ModelFileError(f"LoRA for {target} has no such weight in the base model; the adapter is for another model")
        merged[target] = merge_lora_pair(merged[target], a, b, alpha / r, name=target)
    return merged
