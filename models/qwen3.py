"""Qwen3 decoder (the FastSLM LLM) with an explicit, functional KV cache.

Module names follow Hugging Face's Qwen3 checkpoints (`model.layers.N.self_attn.q_proj`,
...), so their safetensors load by name. The core is `forward_embeds`: inputs_embeds,
position_ids and one past key/value tensor per layer in; logits and the present
key/value tensors (past concatenated with the new positions) out. It has no Python
branch on tensor values and mutates nothing, so one exported graph serves prefill and
decode, with a past of any length including zero.

Per layer: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). Attention: grouped-query
(num_kv_heads < num_heads), RMSNorm on q and k per head, rotary positions (rotate-half).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.errors import ModelFileError
from ..runtime.kv_cache import KVCache
from .weights import assign_checked, read_json, read_safetensors_folder


@dataclass(frozen=True)
class Qwen3Dims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def qwen3_4b(cls) -> "Qwen3Dims":
        return cls(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                   num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, max_position_embeddings=40960)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "Qwen3Dims":
        """Read a Hugging Face Qwen3 config.json (transformers 4.x or 5.x layout)."""
        model_type = config.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ModelFileError(f"config.json is for model_type {model_type!r}, not 'qwen3'; point at a Qwen3 folder")
        if config.get("hidden_act", "silu") != "silu":
            raise ModelFileError(f"config.json asks for hidden_act {config['hidden_act']!r}; Qwen3 uses 'silu'")
        if config.get("attention_bias", False):
            raise ModelFileError("config.json asks for attention_bias, which fastslm's Qwen3 does not support")
        if config.get("use_sliding_window", False):
            raise ModelFileError("config.json asks for sliding-window attention, which fastslm's Qwen3 does not support")
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rope_theta=_rope_theta(config),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_position_embeddings=int(config.get("max_position_embeddings", 40960)),
            )
        except KeyError as exc:
            raise ModelFileError(f"config.json lacks {exc.args[0]!r}: it is not a Qwen3 config") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Qwen3Dims":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFileError(f"qwen3 config has unknown keys {unknown}: it was written by another fastslm version")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFileError(f"qwen3 config is incomplete ({exc}); convert the model again") from None


def _rope_theta(config: dict[str, Any]) -> float:
    """rope_theta from the top level or from the rope_parameters / rope_scaling dicts; plain RoPE only."""
    theta = config.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ModelFileError(f"config.json asks for rope scaling {kind!r} in {key}, which fastslm's Qwen3 does not "
                                 "support; use the model's config without rope scaling")
        theta = params.get("rope_theta", theta)
    return float(theta if theta is not None else 10000.0)


# ---------------------------------------------------------------------------------------------
# Free functions: rotary positions and the causal mask


def rope_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2, float32: (head_dim // 2,)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, both halves of head_dim: (B, T, head_dim) each."""
    angles = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # (B, T, hd/2), float32
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x (B, h, T, hd); cos, sin (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, h, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]


def causal_mask(query_len: int | torch.SymInt, key_len: int | torch.SymInt, device: torch.device) -> Tensor:
    """Boolean (T, P + T) mask, True = attend: new token t (position P + t) sees keys <= P + t.

    Built from the shapes alone (P = key_len - query_len), so it exports with dynamic P and T.
    """
    past = key_len - query_len
    q = torch.arange(query_len, device=device)[:, None]  # (T, 1)
    k = torch.arange(key_len, device=device)[None, :]  # (1, P + T)
    return k <= q + past  # (T, P + T)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of q (B, kv, G * T, hd) over k, v (B, kv, S, hd) where mask (G * T, S) is True.

    Eager PyTorch runs its fused kernel, which never holds the (G * T, S) scores. An exported
    graph gets the same product written out, because onnxscript's decomposition of the fused op
    scales and transposes K itself (two copies of the cache per step): here the scale goes on
    the query and K^T feeds the MatMul directly, which ONNX Runtime fuses into one GEMM reading K
    in place. The export checks hold the two forms to the same tolerances as every graph.
    """
    if not torch.compiler.is_exporting():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, kv, G * T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@dataclass
class CacheOpInputs:
    """What ONNX Runtime's attention op reads beyond q, k, v and the cache (see `cache_attention_op`)."""

    past_length: Tensor  # (B,) int64: cached positions per row
    position_ids: Tensor  # (B, T) int64
    cos_cache: Tensor  # (max_positions, hd / 2): cos(position * inv_freq), the op's rotary table
    sin_cache: Tensor

    @classmethod
    def for_export(cls, past_length: Tensor, position_ids: Tensor, inv_freq: Tensor, max_positions: int,
                   dtype: torch.dtype) -> "CacheOpInputs":  # fmt: skip
        # The table is built from inv_freq inside the graph (ONNX Runtime folds it once at load),
        # so a bundle stores the 64 frequencies, not max_positions x 64 angles.
        positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        angles = positions[:, None] * inv_freq[None, :]  # (max_positions, hd / 2), float32
        return cls(past_length, position_ids, angles.cos().to(dtype), angles.sin().to(dtype))


def cache_attention_op(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                       op: CacheOpInputs) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """ONNX Runtime's GroupQueryAttention in an exported graph: (B, T, h * hd) attention, present keys and values.

    q (B, h, T, hd) and k, v (B, kv, T, hd), normed but not yet rotated: the op rotates q and k
    itself (rotate-half, from `op`'s tables at `op.position_ids`), which replaces a dozen small
    element-wise kernels per layer with none. It appends k, v at rows [past_length,
    past_length + T) and reads the cache where it lies. Fed past (B, kv, P, hd) of P =
    past_length rows, its present is past + new as the plain graph's; fed one buffer of any
    capacity as both past and present (ONNX Runtime IO binding), it writes the new rows into that
    buffer and copies nothing else, which is what keeps a long context's decode step from
    copying the whole cache (runtime/onnx_backend.py). Scale 1/sqrt(hd) and the causal offset
    are the op's defaults. The op's own q/k norm inputs would fold the norms in too, but ONNX
    Runtime's CPU kernel refuses them.
    """
    B, h, T, hd = q.shape
    kv, P = past_k.shape[1], past_k.shape[2]
    flat = lambda t: t.transpose(1, 2).reshape(B, T, t.shape[1] * hd)  # noqa: E731  (B, T, heads * hd)
    seqlens_k = (op.past_length + T - 1).to(torch.int32)  # (B,): the op's "total length - 1" per row
    total = (op.past_length.max() + T).to(torch.int32)  # scalar
    # query_seqlens (all T rows valid): the op then takes chunks after a past for batches above 1 too.
    query_seqlens = (op.past_length * 0 + T).to(torch.int32)
    unused = [None] * 6  # attention_bias, head_sink, k/v scales, q/k norms
    y, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [flat(q), flat(k), flat(v), past_k, past_v, seqlens_k, total, op.cos_cache, op.sin_cache, op.position_ids,
         *unused, query_seqlens],
        {"num_heads": h, "kv_num_heads": kv, "do_rotary": 1}, dtypes=[q.dtype, past_k.dtype, past_v.dtype],
        shapes=[(B, T, h * hd), (B, kv, P + T, hd), (B, kv, P + T, hd)], version=1,
    )  # fmt: skip
    return y, present_k, present_v


# ---------------------------------------------------------------------------------------------
# Modules (Hugging Face names)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        if torch.compiler.is_exporting():
            # x / sqrt(...) is the form ONNX Runtime fuses into one SimplifiedLayerNormalization
            # kernel; x * rsqrt(...) stays 5 kernels (Pow, ReduceMean, Sqrt, Reciprocal, Mul) per
            # norm. The export checks hold the graph to the eager form's numbers.
            normed = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, dims: Qwen3Dims):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.hidden_size, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(dims.hidden_size, dims.num_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(dims.hidden_size, dims.num_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.hidden_size, bias=False)
        self.q_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)
        self.k_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, cache_op: CacheOpInputs | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """cache_op: exported for ONNX Runtime as its cache-in-place attention op, which rotates q and k itself."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        if cache_op is not None:
            y, k, v = cache_attention_op(q, k, v, past_k, past_v, cache_op)
            return self.o_proj(y), k, v
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        k = torch.cat([past_k, k], dim=2)  # (B, kv, P + T, hd) = present
        v = torch.cat([past_v, v], dim=2)
        S = k.shape[2]
        group = self.n_heads // self.n_kv  # query heads h uses kv head h // group
        # The group's query heads are folded into the query rows, (B, kv, group * T, hd), so K and
        # V are read as stored. Expanding them to all heads made exported graphs copy the cache
        # to every head, then transpose and scale that copy, at each decode step: at 6,000
        # positions those copies took 172 ms of a 207 ms step of a 1-layer published-width model.
        q = q.reshape(B, self.n_kv, group * T, self.head_dim)
        mask = causal_mask(T, S, x.device).repeat(group, 1)  # (group * T, S): row g * T + t is query t
        y = grouped_attention(q, k, v, mask)  # (B, kv, group * T, hd)
        y = y.reshape(B, self.n_heads, T, self.head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, h * hd)
        return self.o_proj(y), k, v


class Qwen3MLP(nn.Module):
    def __init__(self, dims: Qwen3Dims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False)
        self.down_proj = nn.Linear(dims.intermediate_size, dims.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, dims: Qwen3Dims):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.self_attn = Qwen3Attention(dims)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)
        self.mlp = Qwen3MLP(dims)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, cache_op: CacheOpInputs | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, cache_op)
        x = x + attn  # (B, T, H)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Qwen3Model(nn.Module):
    def __init__(self, dims: Qwen3Dims):
        super().__init__()
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(dims) for _ in range(dims.num_layers))
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps)


@dataclass
class Qwen3Output:
    logits: Tensor  # (B, T or 1, V) float32
    past: KVCache  # present keys/values, (B, n_kv, P + T, hd) per layer


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, dims: Qwen3Dims):
        super().__init__()
        self.dims = dims
        self.model = Qwen3Model(dims)
        self.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False)
        # Computed once, in fp32 on the CPU, and kept out of the module's buffers so that neither
        # .half() nor building on the meta device touches it. Recomputed inside an exported
        # graph, constant folding gets theta^(-2i/d) 1 ulp off, which at position 40k turns the
        # angles by ~3e-3.
        self.inv_freq = rope_frequencies(dims.head_dim, dims.rope_theta, device=torch.device("cpu"))
        if dims.tie_word_embeddings:
            self.tie_weights()
            # Tied: the saved state holds model.embed_tokens.weight only; loading re-ties.
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
            self.register_load_state_dict_post_hook(lambda module, _incompatible: module.tie_weights())

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    # -- the exportable core ------------------------------------------------------------------

    def forward_embeds(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        past_keys: list[Tensor],
        past_values: list[Tensor],
        logits_index: Tensor | None = None,
        past_length: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """inputs_embeds (B, T, H), position_ids (B, T) int64, past (B, kv, P, hd) per layer, P >= 0.

        Returns logits (B, K, V) float32 for the K positions in `logits_index` (all T when None)
        and present keys/values (B, kv, P + T, hd) per layer. Rows are picked before the final
        norm and the vocabulary projection: a prefill needs one row, and projecting every prompt
        position onto a 152k vocabulary would cost ~10% of a real Qwen3-4B prefill.
        past_length (B,) int64, the cached positions per row: given, an ONNX export writes ONNX
        Runtime's attention op that can update a cache buffer in place (`cache_attention_op`); the
        numbers are the same.
        """
        x = inputs_embeds  # (B, T, H)
        inv_freq = self.inv_freq.to(x.device)
        cos = sin = cache_op = None
        if past_length is not None and torch.compiler.is_exporting():
            cache_op = CacheOpInputs.for_export(past_length, position_ids, inv_freq, self.dims.max_position_embeddings, x.dtype)
        else:
            cos, sin = rope_cos_sin(position_ids, inv_freq, x.dtype)  # angles in fp32
        present_keys, present_values = [], []
        for layer, past_k, past_v in zip(self.model.layers, past_keys, past_values, strict=True):
            x, k, v = layer(x, cos, sin, past_k, past_v, cache_op)
            present_keys.append(k)
            present_values.append(v)
        if logits_index is not None:
            x = x.index_select(1, logits_index)  # (B, K, H)
        logits = self.lm_head(self.model.norm(x)).float()  # (B, K, V)
        return logits, present_keys, present_values

    # -- convenience around it --------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, H)

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        ref = self.model.embed_tokens.weight
        shape = (batch, self.dims.num_kv_heads, 0, self.dims.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)  # noqa: E731
        n = self.dims.num_layers
        return KVCache([make() for _ in range(n)], [make() for _ in range(n)])

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        past: KVCache | None = None,
        last_only: bool = False,
    ) -> Qwen3Output:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        B, T, _ = inputs_embeds.shape
        if past is None:
            past = self.empty_cache(B, inputs_embeds.dtype, inputs_embeds.device)
        if past.num_layers != self.dims.num_layers:
            raise ValueError(f"KV cache has {past.num_layers} layers, the model {self.dims.num_layers}")
        if position_ids is None:
            start = past.length
            position_ids = torch.arange(start, start + T, device=inputs_embeds.device).expand(B, T)
        last = torch.tensor([T - 1], device=inputs_embeds.device) if last_only else None
        logits, keys, values = self.forward_embeds(inputs_embeds, position_ids, list(past.keys), list(past.values), last)
        return Qwen3Output(logits=logits, past=KVCache(keys, values))

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "Qwen3ForCausalLM":
        """Load a local Hugging Face Qwen3 folder (config.json + model.safetensors or shards)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(f"model folder {folder} does not exist; pass a local Hugging Face Qwen3 folder")
        dims = Qwen3Dims.from_hf_config(read_json(folder / "config.json"))
        with torch.device("meta"):
            model = cls(dims)
        ignore = ["*rotary_emb.inv_freq"] + (["lm_head.weight"] if dims.tie_word_embeddings else [])
        tensors = read_safetensors_folder(folder, dtype=dtype, skip=ignore)
        assign_checked(model, tensors, ignore=ignore, source=f"Qwen3 weights in {folder}")
        return model.eval()


def _drop_tied_head(module: Qwen3ForCausalLM, state_dict: dict, prefix: str, _meta: Any) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_head(module: Qwen3ForCausalLM, state_dict: dict, prefix: str, *_args: Any) -> None:
    embed = state_dict.get(prefix + "model.embed_tokens.weight")
    if embed is not None:
        state_dict[prefix + "lm_head.weight"] = embed
