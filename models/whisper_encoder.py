"""Whisper's audio encoder: one 30 s log-mel window -> frame features.

    mel (B, n_mels, 3000) -> conv1 + GELU -> conv2 (stride 2) + GELU -> + sinusoidal positions
      -> n_layers pre-norm blocks (full self-attention, 4x GELU MLP) -> ln_post -> (B, 1500, width)

Module names are openai-whisper's (conv1, blocks.N.attn.query, mlp.0, ...): the FastSLM
checkpoint stores the encoder under `encoder.whisper.` with these names (a fastslm model folder
under `audio_tower.whisper.`), so it loads by stripping that prefix.
`WhisperEncoder.from_pretrained` also reads an openai-whisper `.pt`, a Hugging Face Whisper
folder and a CTranslate2 Whisper folder, each through an explicit key map; it only reads local
files (the readers are in models/whisper_checkpoints.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.errors import ModelFileError, OptionError
from .weights import assign_checked


@dataclass(frozen=True)
class WhisperEncoderDims:
    """Defaults are Whisper large-v3's encoder (the one FastSLM uses)."""

    n_mels: int = 128
    n_ctx: int = 1500  # output frames; the input has 2 * n_ctx mel frames (conv2 has stride 2)
    width: int = 1280
    n_heads: int = 20
    n_layers: int = 32

    def __post_init__(self) -> None:
        if self.width % self.n_heads or self.width % 2:
            raise ValueError(f"width {self.width} must be even and divisible by n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def n_frames(self) -> int:
        return 2 * self.n_ctx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WhisperEncoderDims":
        names = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d]
        if unknown or missing:
            raise ModelFileError(
                f"Whisper encoder config has unknown keys {unknown} / lacks {missing}: "
                "config.json was written by another tool or version; convert the model again"
            )
        return cls(**{n: int(d[n]) for n in names})


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """(length, channels) fixed positions: sin of every timescale, then cos (Whisper's layout).

    Timescales run geometrically from 1 to max_timescale over channels // 2 steps.
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoids need an even number of channels >= 4, got {channels}")
    half = channels // 2
    increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float32))  # (C/2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]  # (L, C/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, C)


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) whose statistics are computed in float32 whatever the weights' dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Full (non-causal) multi-head self-attention; Whisper's key projection has no bias."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        q = self.query(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, H, T, hd)
        k = self.key(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, H, T, hd)
        v = self.value(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd), scale 1/sqrt(hd)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, T, D)


class EncoderBlock(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.attn = SelfAttention(width, n_heads)
        self.attn_ln = LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_ln = LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))  # (B, T, D)


class WhisperEncoder(nn.Module):
    def __init__(self, dims: WhisperEncoderDims = WhisperEncoderDims()):
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.width, dims.width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_ctx, dims.width))  # (n_ctx, D)
        self.blocks = nn.ModuleList(EncoderBlock(dims.width, dims.n_heads) for _ in range(dims.n_layers))
        self.ln_post = LayerNorm(dims.width)

    def forward(self, mel: Tensor) -> Tensor:  # (B, n_mels, 3000) -> (B, n_ctx, D)
        return self.head(self.hidden(mel, 0), 0)

    def hidden(self, mel: Tensor, n_blocks: int) -> Tensor:
        """The residual stream after the convolutions and the first `n_blocks` blocks: (B, n_ctx, D).

        With `head` it splits the encoder where a recipe stores a frozen bottom and trains the top.
        """
        d = self.dims
        if mel.dim() != 3 or mel.shape[1] != d.n_mels or mel.shape[2] != d.n_frames:
            raise ValueError(
                f"WhisperEncoder expects mel shaped (batch, {d.n_mels}, {d.n_frames}), got {tuple(mel.shape)}: "
                f"compute {d.n_mels} mel bins and pad or cut each window to 30 s"
            )
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))  # (B, D, 3000)
        x = F.gelu(self.conv2(x))  # (B, D, 1500)
        x = x.transpose(1, 2) + self.positional_embedding  # (B, 1500, D)
        for block in self.blocks[:n_blocks]:
            x = block(x)  # (B, 1500, D)
        return x

    def head(self, hidden: Tensor, from_block: int) -> Tensor:
        """The encoder's output from `hidden(mel, from_block)`: the remaining blocks, then ln_post."""
        for block in self.blocks[from_block:]:
            hidden = block(hidden)
        return self.ln_post(hidden)  # (B, 1500, D)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "WhisperEncoder":
        """Load from an openai-whisper `.pt`, a Hugging Face folder or a CTranslate2 folder (local only)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise OptionError(f"dtype must be a floating torch dtype, got {dtype!r}")
        from .whisper_checkpoints import read_whisper_encoder

        path = Path(path)
        dims, tensors = read_whisper_encoder(path)
        with torch.device("meta"):
            model = cls(dims)
        assign_checked(model, {k: t.to(dtype) for k, t in tensors.items()}, source=str(path))
        return model.eval()
