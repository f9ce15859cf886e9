"""FastSLM: the audio tower (Whisper encoder + HFQ-Former) feeding a Qwen3 decoder.

Modules: `audio_tower` (`whisper`, `hfq_former`) and `llm`; model folders store the weights under
those paths (`audio_tower.whisper.*`, ...), older folders' names are read through
models.weights.current_key.

The two stages stay separate on purpose: the audio tower maps each 30 s window to a fixed
number of speech tokens independently of the others, and the LLM consumes them as prompt
embeddings. Export, batching, streaming and prefix caching all build on that split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..runtime.bundle import (
    CONFIG_FILE, MODEL_FORMAT, MODEL_FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
)  # fmt: skip
from ..runtime.errors import ModelFileError
from ..runtime.output_folder import with_new_file_mode
from ..runtime.sampling import SamplingOptions
from .hfq_former import HFQFormer, HFQFormerDims
from .qwen3 import Qwen3Dims, Qwen3ForCausalLM
from .weights import assign_checked
from .whisper_encoder import WhisperEncoder, WhisperEncoderDims

PARTS = ("audio_tower", "llm")  # the model's two top-level modules


@dataclass(frozen=True)
class FastSLMConfig:
    whisper: WhisperEncoderDims
    hfq_former: HFQFormerDims
    qwen3: Qwen3Dims
    name: str = "fastslm"
    description: str = ""
    # The decoding the model is meant to be read with (runtime SamplingOptions fields; empty: greedy).
    decoding: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        SamplingOptions.from_config({"decoding": self.decoding}, "the model config")  # raises on a bad option
        if self.hfq_former.width != self.whisper.width:
            raise ValueError(f"HFQ-Former width {self.hfq_former.width} != Whisper width {self.whisper.width}")
        if self.hfq_former.n_frames != self.whisper.n_ctx:
            raise ValueError(f"HFQ-Former expects {self.hfq_former.n_frames} frames, Whisper gives {self.whisper.n_ctx}")
        if self.hfq_former.llm_dim != self.qwen3.hidden_size:
            raise ValueError(f"llm_proj width {self.hfq_former.llm_dim} != LLM hidden size {self.qwen3.hidden_size}")

    @property
    def n_mels(self) -> int:
        return self.whisper.n_mels

    @property
    def tokens_per_window(self) -> int:
        return self.hfq_former.n_queries

    def to_dict(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "whisper": self.whisper.to_dict(),
            "hfq_former": self.hfq_former.to_dict(),
            "qwen3": self.qwen3.to_dict(),
            **({"decoding": dict(self.decoding)} if self.decoding else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FastSLMConfig":
        if d.get("format") != MODEL_FORMAT:
            raise ModelFileError(
                f"config.json is not a fastslm model config (format {d.get('format')!r}); "
                "write one with `fastslm-convert`"
            )
        if d.get("format_version", 0) > MODEL_FORMAT_VERSION:
            raise ModelFileError(
                f"model format version {d['format_version']} is newer than this fastslm supports "
                f"({MODEL_FORMAT_VERSION}); upgrade fastslm"
            )
        return cls(
            whisper=WhisperEncoderDims.from_dict(d["whisper"]),
            hfq_former=HFQFormerDims.from_dict(d["hfq_former"]),
            qwen3=Qwen3Dims.from_dict(d["qwen3"]),
            name=d.get("name", "fastslm"),
            description=d.get("description", ""),
            decoding=d.get("decoding", {}),
        )


class AudioTower(nn.Module):
    """mel windows (W, n_mels, 3000) -> speech tokens (W, n_queries, llm_dim)."""

    def __init__(self, whisper: WhisperEncoderDims, hfq_former: HFQFormerDims):
        super().__init__()
        self.whisper = WhisperEncoder(whisper)
        self.hfq_former = HFQFormer(hfq_former)

    def forward(self, mel: Tensor) -> Tensor:
        return self.hfq_former(self.whisper(mel))  # (W, 1500, D) -> (W, 50, llm_dim)


class FastSLM(nn.Module):
    def __init__(self, config: FastSLMConfig):
        super().__init__()
        self.config = config
        self.audio_tower = AudioTower(config.whisper, config.hfq_former)
        self.llm = Qwen3ForCausalLM(config.qwen3)

    def encode_audio(self, mel: Tensor) -> Tensor:
        return self.audio_tower(mel)

    # ---- the project's own model folder -------------------------------------------------

    def save_pretrained(self, folder: str | Path, tokenizer_json: str | Path | None = None) -> None:
        """Write config.json, model.safetensors (LoRA already merged) and tokenizer.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # Sinusoid tables are recomputed at construction and the tied head shares the embedding
        # table, so neither is stored (3.6 MB of the 36 MB demo model were sinusoids).
        derived = set(_derived_keys(self))
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items() if name not in derived}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
        with_new_file_mode(folder / WEIGHTS_FILE)  # safetensors writes owner-only files; a model folder is shared
        if tokenizer_json is not None:
            source = Path(tokenizer_json)
            if source.resolve() != (folder / TOKENIZER_FILE).resolve():
                (folder / TOKENIZER_FILE).write_bytes(source.read_bytes())

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, parts: tuple[str, ...] = PARTS
    ) -> "FastSLM":
        """Load a model folder (model.safetensors, or shards with model.safetensors.index.json).

        Only the named `parts` ("audio_tower", "llm") are read, each tensor cast to `dtype` as it is
        read; the others stay on the meta device (an exporter that streams the LLM's weights
        itself needs the audio tower only).
        """
        folder = Path(folder)
        config = read_config(folder)
        if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX_FILE).is_file():
            raise ModelFileError(f"{folder} has no {WEIGHTS_FILE}; re-create the model folder")
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; choose from {PARTS}")
        from .weights import SafetensorsFolder

        store = SafetensorsFolder(folder)
        with torch.device("meta"):
            model = cls(config)
        derived = _derived_keys(model)
        for part in parts:
            prefix = part + "."
            tensors = {k[len(prefix) :]: store.get(k, dtype) for k in store.keys() if k.startswith(prefix)}
            ignore = [n[len(prefix) :] for n in derived if n.startswith(prefix)]
            assign_checked(getattr(model, part), tensors, ignore=ignore, source=str(folder))
        _fill_derived(model, dtype)
        stray = [k for k in store.keys() if k.split(".", 1)[0] not in PARTS]
        if stray:
            raise ModelFileError(f"{folder} has unexpected key {stray[0]}: the weights are for another model")
        return model.eval()


def read_config(folder: Path) -> FastSLMConfig:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFileError(f"{folder} has no {CONFIG_FILE}: give a fastslm model folder (see `fastslm-convert`)")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{config_path} is unreadable ({exc}); re-create the model folder") from None
    SamplingOptions.from_config(data, config_path)  # checked here too, so that its error names the file
    try:
        return FastSLMConfig.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{config_path} is unreadable ({exc}); re-create the model folder") from None


def _fill_derived(model: FastSLM, dtype: torch.dtype) -> None:
    """Give the sinusoid buffers of a model built on the meta device their values (they are never stored)."""
    from .whisper_encoder import sinusoids

    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and (name.endswith("_pos_embeds") or name.endswith("positional_embedding")):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_buffer(leaf, sinusoids(*buffer.shape).to(dtype), persistent=True)


def _derived_keys(model: FastSLM) -> tuple[str, ...]:
    """State-dict entries recomputed at construction rather than read from files."""
    keys = [name for name in model.state_dict() if name.endswith("_pos_embeds") or name.endswith("positional_embedding")]
    if model.config.qwen3.tie_word_embeddings:
        keys.append("llm.lm_head.weight")
    return tuple(keys)
