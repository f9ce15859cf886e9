"""Load the published FastSLM checkpoint (the reference repository's key layout).

Two forms are accepted:
- the full state dict (`Stage3_FastSLM.pt`): Whisper under `encoder.whisper.*`, the HFQ-Former
  under the rest of `encoder.*`, Qwen3 under PEFT LoRA naming `llm.base_model.model.*`;
- an HFQ-Former-and-LoRA-only state dict, assembled with a separate Whisper large-v3 checkpoint
  (openai-whisper `.pt` or Hugging Face folder) and the Qwen3-4B folder's base weights.

The published names are the reference code's and stay as they are; they are mapped onto ours
(`audio_tower.whisper.*`, `audio_tower.hfq_former.*`, `llm.*`) here.

Both come with the Qwen3 folder's config.json and tokenizer.json; the tokenizer gets
FastSLM's special tokens appended exactly as the reference adds them, so their ids match
the rows of the embedding table the model was trained with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..runtime.errors import ModelFileError
from ..runtime.prompt import SPECIAL_TOKENS
from .fastslm import FastSLM, FastSLMConfig
from .hfq_former import HFQFormerDims
from .lora import merge_lora_into, merge_peft_state_dict
from .qwen3 import Qwen3Dims
from .whisper_encoder import WhisperEncoder, WhisperEncoderDims

PUBLISHED_WHISPER_PREFIX = "encoder.whisper."
PUBLISHED_HFQ_FORMER_PREFIX = "encoder."  # everything under it but `whisper.`
LLM_PEFT_PREFIX = "llm.base_model.model."
# Earlier versions of the reference code named the compressors `resampler*`.
LEGACY_RENAMES = (
    (re.compile(r"^encoder\.resampler([123])\."), r"encoder.compressor\1."),
    (re.compile(r"^encoder\.resampler\."), "encoder.compressor."),
)
# Whisper's rule (64-wide heads), which the reference follows for the HFQ-Former too; the head
# count is not stored in a state dict.
HEAD_WIDTH = 64


@dataclass(frozen=True)
class LoRASettings:
    alpha: float = 64.0
    r: int = 16

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def read_torch_checkpoint(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist; pass the path of Stage3_FastSLM.pt")
    try:
        # weights_only: never run code from a downloaded pickle; mmap keeps 9 GB off the heap.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise ModelFileError(f"cannot read {path} as a weights-only PyTorch checkpoint ({type(exc).__name__}); re-download it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(f"{path} is not a state dict of tensors; pass the FastSLM checkpoint")
    return {_legacy_rename(k.removeprefix("module.")): v for k, v in state.items()}


def _legacy_rename(name: str) -> str:
    for pattern, replacement in LEGACY_RENAMES:
        name = pattern.sub(replacement, name)
    return name


def infer_whisper_dims(whisper: dict[str, Tensor]) -> WhisperEncoderDims:
    n_layers = 1 + max(int(k.split(".")[1]) for k in whisper if k.startswith("blocks."))
    width = whisper["conv1.weight"].shape[0]
    return WhisperEncoderDims(
        n_mels=whisper["conv1.weight"].shape[1],
        n_ctx=whisper["positional_embedding"].shape[0],
        width=width,
        n_heads=width // HEAD_WIDTH,
        n_layers=n_layers,
    )


def infer_hfq_dims(hfq_former: dict[str, Tensor], n_frames: int) -> HFQFormerDims:
    width = hfq_former["compressor1.query"].shape[-1]
    return HFQFormerDims(
        width=width,
        n_heads=width // HEAD_WIDTH,
        n_frames=n_frames,
        stage_queries=tuple(hfq_former[f"compressor{i}.query"].shape[1] for i in (1, 2, 3)),
        n_queries=hfq_former["compressor.query"].shape[1],
        n_out_blocks=1 + max(int(k.split(".")[1]) for k in hfq_former if k.startswith("out_attn.")),
        llm_dim=hfq_former["llm_proj.weight"].shape[0],
    )


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_reference_checkpoint(
    checkpoint: str | Path,
    qwen_dir: str | Path,
    whisper: str | Path | None = None,
    lora: LoRASettings = LoRASettings(),
    dtype: torch.dtype = torch.float32,
) -> FastSLM:
    """Build a FastSLM (LoRA merged) from the published files; see the module docstring."""
    qwen_dir = Path(qwen_dir)
    config_path = qwen_dir / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{qwen_dir} has no config.json; pass the Qwen3-4B folder (config.json, tokenizer.json)")
    qwen_dims = Qwen3Dims.from_hf_config(json.loads(config_path.read_text()))
    state = read_torch_checkpoint(checkpoint)

    whisper_state = _strip(state, PUBLISHED_WHISPER_PREFIX)
    if not whisper_state:
        if whisper is None:
            raise ModelFileError(
                f"{checkpoint} holds no Whisper weights (HFQ-Former and LoRA only); pass --whisper with Whisper large-v3"
            )
        whisper_state = WhisperEncoder.from_pretrained(whisper).state_dict()
    hfq_former_state = {
        k: v for k, v in _strip(state, PUBLISHED_HFQ_FORMER_PREFIX).items() if not k.startswith("whisper.")
    }
    if "compressor1.query" not in hfq_former_state:
        raise ModelFileError(f"{checkpoint} has no HFQ-Former weights (encoder.compressor1.*); is it a FastSLM checkpoint?")

    llm_state = {LLM_PEFT_PREFIX + k: v for k, v in _strip(state, LLM_PEFT_PREFIX).items()}
    has_base = any(k.endswith(".base_layer.weight") for k in llm_state)
    if has_base:
        llm_weights = merge_peft_state_dict(llm_state, prefix=LLM_PEFT_PREFIX, alpha=lora.alpha, r=lora.r)
    else:
        from .qwen3 import Qwen3ForCausalLM

        base = Qwen3ForCausalLM.from_pretrained(qwen_dir, dtype=dtype).state_dict()
        llm_weights = merge_lora_into(base, llm_state, prefix=LLM_PEFT_PREFIX, alpha=lora.alpha, r=lora.r)

    whisper_dims = infer_whisper_dims(whisper_state)
    config = FastSLMConfig(
        whisper=whisper_dims,
        hfq_former=infer_hfq_dims(hfq_former_state, whisper_dims.n_ctx),
        qwen3=qwen_dims,
        name=Path(checkpoint).stem,
        description="converted from the published FastSLM checkpoint",
    )
    tensors = {f"audio_tower.whisper.{k}": v for k, v in whisper_state.items()}
    tensors.update({f"audio_tower.hfq_former.{k}": v for k, v in hfq_former_state.items()})
    tensors.update({f"llm.{k}": v for k, v in llm_weights.items()})
    from .fastslm import _derived_keys
    from .weights import assign_checked

    model = FastSLM(config)
    assign_checked(model, tensors, ignore=_derived_keys(model), source=str(checkpoint))
    return model.to(dtype).eval()


def fastslm_tokenizer(qwen_dir: str | Path):
    """The Qwen3 tokenizer with FastSLM's special tokens appended in the reference's order."""
    from tokenizers import AddedToken

    from ..runtime.tokenizer import read_tokenizer_file

    path = Path(qwen_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(f"{qwen_dir} has no tokenizer.json; pass the Qwen3-4B folder")
    tokenizer = read_tokenizer_file(path, restore="download the Qwen3-4B folder again")
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tokenizer
