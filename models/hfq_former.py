"""HFQ-Former: the hierarchical frame Q-Former that turns one 30 s window of Whisper
features into a fixed, small number of speech tokens for the LLM.

    encoder frames (1500) ──compressor1──► 80 tokens
        │ stage1 (Downsampler)
        ▼ 750 frames ─────compressor2──► 80 tokens
        │ stage2 (Downsampler)
        ▼ 375 frames ─────compressor3──► 80 tokens
                                   concat: 240 tokens ──compressor──► 50 tokens
    memory = concat(1500, 750, 375 frames) ──► out_attn blocks (self + cross attention)
    ──► llm_proj ──► 50 speech tokens of the LLM's width

Module and parameter names below the HFQ-Former follow the published checkpoint
(`encoder.compressor1.*`, `encoder.stage1.*`, `encoder.out_attn.0.*`, `encoder.llm_proj.*`), so
loading it is a prefix map (to `audio_tower.hfq_former.*`), not a rename table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .whisper_encoder import sinusoids

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class HFQFormerDims:
    width: int = 1280  # Whisper encoder width; the HFQ-Former works at this width throughout
    n_heads: int = 20
    n_frames: int = 1500  # Whisper encoder frames per 30 s window
    stage_queries: tuple[int, int, int] = (80, 80, 80)
    n_queries: int = 50  # speech tokens per window handed to the LLM
    n_out_blocks: int = 2
    llm_dim: int = 2560

    def __post_init__(self) -> None:
        if self.width % self.n_heads:
            raise ValueError(f"HFQ-Former width {self.width} is not divisible by {self.n_heads} heads")
        object.__setattr__(self, "stage_queries", tuple(self.stage_queries))

    @property
    def stage_frames(self) -> tuple[int, int, int]:
        """Frames seen by each stage's compressor: the encoder output, then two stride-2 halvings."""
        f1 = self.n_frames
        f2 = downsampled_length(f1)
        return f1, f2, downsampled_length(f2)

    @property
    def memory_frames(self) -> int:
        return sum(self.stage_frames)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HFQFormerDims":
        return cls(**d)


def downsampled_length(n: int) -> int:
    """Length after Conv1d(kernel 3, stride 2, padding 1)."""
    return (n - 1) // 2 + 1


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)  # (B, H, T, hd)


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)  # (B, T, D)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v, unmasked, written out rather than through
    F.scaled_dot_product_attention: the HFQ-Former's attentions are 50-150 queries over up to
    2,625 frames, where PyTorch's CPU flash kernel is slow (measured: the HFQ-Former's training step
    on 8 windows 1.14 s with it, 0.87 s written out, 2 cores, bf16)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Compressor(nn.Module):
    """Learned queries cross-attend once over a sequence of frames (no key/value projection:
    keys are the normalised frames plus sinusoidal positions, values the normalised frames)."""

    def __init__(self, width: int, n_heads: int, n_queries: int, n_ctx: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.empty(1, n_queries, width).normal_(std=0.02))
        self.q_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.kv_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.out_proj = nn.Linear(width, width)
        # Persistent, as in the published checkpoint, so strict loading sees the same keys.
        self.register_buffer("q_pos_embeds", sinusoids(n_queries, width))
        self.register_buffer("kv_pos_embeds", sinusoids(n_ctx, width))

    def forward(self, frames: Tensor) -> Tensor:
        # frames: (B, T, D) -> (B, Q, D)
        q = self.q_ln(self.query).expand(frames.shape[0], -1, -1) + self.q_pos_embeds
        x = self.kv_ln(frames)
        k = x + self.kv_pos_embeds
        out = attention(split_heads(q, self.n_heads), split_heads(k, self.n_heads), split_heads(x, self.n_heads))
        return self.out_proj(merge_heads(out))


class Downsampler(nn.Module):
    """Halves the frame rate: Conv1d + GELU, strided Conv1d + GELU, LayerNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.ln_post = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, frames: Tensor) -> Tensor:
        x = frames.transpose(1, 2)  # (B, D, T)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # (B, D, T/2)
        return self.ln_post(x.transpose(1, 2))  # (B, T/2, D)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention; as in the checkpoint, the key projection has no bias."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        source = x if memory is None else memory
        q = split_heads(self.q(x), self.n_heads)  # (B, H, Tq, hd)
        k = split_heads(self.k(source), self.n_heads)  # (B, H, Tk, hd)
        v = split_heads(self.v(source), self.n_heads)
        return self.out_proj(merge_heads(attention(q, k, v)))


class OutAttentionBlock(nn.Module):
    """Refines the speech tokens: self-attention, then cross-attention over all stage frames."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.attn = MultiHeadAttention(width, n_heads)
        self.cross_attn = MultiHeadAttention(width, n_heads)
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, tokens: Tensor, memory: Tensor) -> Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.cross_attn(self.norm2(tokens), memory)


class HFQFormer(nn.Module):
    def __init__(self, dims: HFQFormerDims):
        super().__init__()
        self.dims = dims
        d, h = dims.width, dims.n_heads
        f1, f2, f3 = dims.stage_frames
        q1, q2, q3 = dims.stage_queries
        self.compressor1 = Compressor(d, h, q1, f1)
        self.stage1 = Downsampler(d)
        self.compressor2 = Compressor(d, h, q2, f2)
        self.stage2 = Downsampler(d)
        self.compressor3 = Compressor(d, h, q3, f3)
        self.compressor = Compressor(d, h, dims.n_queries, q1 + q2 + q3)
        self.out_attn = nn.ModuleList(OutAttentionBlock(d, h) for _ in range(dims.n_out_blocks))
        self.llm_proj = nn.Linear(d, dims.llm_dim)

    def forward(self, features: Tensor) -> Tensor:
        # features: (W, 1500, D) Whisper encoder output, one row per 30 s window
        stage1 = self.stage1(features)  # (W, 750, D)
        stage2 = self.stage2(stage1)  # (W, 375, D)
        stage_tokens = torch.cat(
            [self.compressor1(features), self.compressor2(stage1), self.compressor3(stage2)], dim=1
        )  # (W, 240, D)
        tokens = self.compressor(stage_tokens)  # (W, 50, D)
        memory = torch.cat([features, stage1, stage2], dim=1)  # (W, 2625, D)
        for block in self.out_attn:
            tokens = block(tokens, memory)
        return self.llm_proj(tokens)  # (W, 50, llm_dim)
