"""The export facts of each FastSLM graph: one small declarative table per graph.

`onnx_export.export_graph` and `onnx_export.validate_graph` read these tables and nothing
else, so a new graph (or a TensorRT profile, or a tighter tolerance) is a change here only.

A table (`GraphSpec`) says: the graph's file, its inputs and outputs in order with shapes
whose str entries are symbolic dims, each symbolic dim's min/opt/max (torch.export bounds and
TensorRT profiles), the sizes to trace with and the cases to validate on, the tolerance per
precision, and the wrapper module that turns a `FastSLM` into the flat-tensor forward the
graph exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..models.fastslm import FastSLM, FastSLMConfig
from ..runtime.audio import WINDOW_FRAMES
from ..runtime.bundle import AUDIO_TOWER, COPIED, IN_PLACE, LLM, kv_input_name, kv_output_name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic dim, named in GraphSpec.dims
    dtype: str = "float32"  # "float32", "int64", or "compute" (the target precision's float type)
    # How validation fills it: "normal" (N(0,1) * scale), "positions" (past + arange(seq), + the
    # case's position_offset), "last_positions" (the last `keep` of arange(seq)), "past_length" (past per row).
    fill: str = "normal"
    scale: float = 1.0


@dataclass(frozen=True)
class DimSpec:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Tolerance:
    """Per output: max |ORT - PyTorch fp32| and/or the minimum cosine similarity.

    max_abs is absolute for outputs of magnitude <= 1 and relative to max |reference| above:
    logits of a real LLM reach ~100, where fp32's own rounding (ulp 7.6e-6) summed over 36
    layers exceeds any fixed absolute bound that would still be meaningful for unit outputs.
    """

    max_abs: float | None = None
    min_cosine: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    sizes: dict[str, int]  # a size for every symbolic dim
    position_offset: int = 0


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimSpec]
    trace: dict[str, int]  # sizes traced with: >= 2 where a dim is dynamic (torch.export specializes 0 and 1)
    cases: tuple[Case, ...]
    tolerances: dict[str, Tolerance]  # by precision
    wrap: Callable[[FastSLM], nn.Module]
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Wrappers: the flat positional forward each graph exports (inputs and outputs in table order)


class AudioTowerGraph(nn.Module):
    """mel (fp32) -> speech tokens (fp32); inside, the model's own dtype (the encoder casts the mel).

    The attribute keeps the model's name, so the graph's layers are named by the model folder's
    module paths (`audio_tower.whisper.blocks.0.attn.query`)."""

    def __init__(self, model: FastSLM):
        super().__init__()
        self.audio_tower = model.audio_tower

    def forward(self, *inputs: Tensor) -> Tensor:
        (mel,) = inputs  # (W, n_mels, 3000)
        return self.audio_tower(mel).float()  # (W, Q, H)


class DecoderGraph(nn.Module):
    """The KV-cache decoder with logits only at `logits_index` (fp32 graph I/O for embeds and logits)."""

    takes_past_length = False

    def __init__(self, model: FastSLM):
        super().__init__()
        self.llm = model.llm
        self.dtype = model.llm.lm_head.weight.dtype

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        inputs_embeds, position_ids, logits_index, *past = inputs  # (B, T, H), (B, T), (K,), [(B,)], 2 per layer
        past_length = past.pop(0) if self.takes_past_length else None
        logits, keys, values = self.llm.forward_embeds(
            inputs_embeds.to(self.dtype), position_ids, past[0::2], past[1::2], logits_index, past_length
        )
        return (logits, *(t for pair in zip(keys, values) for t in pair))


class InPlaceCacheDecoderGraph(DecoderGraph):
    """The decoder for ONNX Runtime: `past_length` in, attention by ONNX Runtime's GroupQueryAttention.

    Fed exact-length past tensors it computes what DecoderGraph does; fed one preallocated buffer
    per layer as both past and present (IO binding), it appends the step's keys and values to the
    buffer instead of copying the cache into new present tensors (models/qwen3.py cache_attention_op).
    TensorRT cannot run that op, and onnxruntime releases before 1.32 refuse it at load: TensorRT
    targets and `--decoder-cache copied` export DecoderGraph.
    """

    takes_past_length = True


# ---------------------------------------------------------------------------------------------
# The tables


def audio_tower_spec(config: FastSLMConfig) -> GraphSpec:
    q, h = config.tokens_per_window, config.qwen3.hidden_size
    return GraphSpec(
        name=AUDIO_TOWER,
        file="audio_tower.onnx",
        description="Whisper encoder + HFQ-Former + llm_proj, one row per 30 s window",
        inputs=(TensorSpec("mel", ("windows", config.n_mels, WINDOW_FRAMES), scale=0.5),),
        outputs=(TensorSpec("speech_tokens", ("windows", q, h)),),
        dims={"windows": DimSpec(1, 4, 8)},
        trace={"windows": 2},
        cases=(Case("1 window", {"windows": 1}), Case("3 windows", {"windows": 3})),
        tolerances={"fp32": Tolerance(max_abs=1e-4), "fp16": Tolerance(min_cosine=0.999)},
        wrap=AudioTowerGraph,
    )


def llm_spec(config: FastSLMConfig, in_place_cache: bool = False) -> GraphSpec:
    """The decoder's table; `in_place_cache`: ONNX Runtime's form (InPlaceCacheDecoderGraph, a `past_length` input)."""
    d = config.qwen3
    ctx = d.max_position_embeddings
    kv = ("batch", d.num_kv_heads, "past", d.head_dim)
    kv_out = ("batch", d.num_kv_heads, "past + seq", d.head_dim)
    layers = range(d.num_layers)
    return GraphSpec(
        name=LLM,
        file="llm.onnx",
        description="Qwen3 KV-cache decoder: prefill (past 0) and decode with one graph",
        inputs=(
            TensorSpec("inputs_embeds", ("batch", "seq", d.hidden_size), scale=0.05),
            TensorSpec("position_ids", ("batch", "seq"), "int64", fill="positions"),
            TensorSpec("logits_index", ("keep",), "int64", fill="last_positions"),
            *((TensorSpec("past_length", ("batch",), "int64", fill="past_length"),) if in_place_cache else ()),
            *(TensorSpec(kv_input_name(i, kind), kv, "compute") for i in layers for kind in ("key", "value")),
        ),
        outputs=(
            TensorSpec("logits", ("batch", "keep", d.vocab_size)),
            *(TensorSpec(kv_output_name(i, kind), kv_out, "compute") for i in layers for kind in ("key", "value")),
        ),
        dims={
            "batch": DimSpec(1, 1, 4),
            "seq": DimSpec(1, 1, ctx),
            "past": DimSpec(0, min(1024, ctx), ctx),
            "keep": DimSpec(1, 1, ctx),
        },
        trace={"batch": 2, "seq": 3, "past": 4, "keep": 2},
        cases=(
            Case("prefill", {"batch": 1, "seq": 9, "past": 0, "keep": 9}),
            Case("decode", {"batch": 1, "seq": 1, "past": 9, "keep": 1}),
            Case("batch 2 chunk", {"batch": 2, "seq": 4, "past": 5, "keep": 2}),
            # Rotary angles at the far end of the context: where fp16 angles would break.
            Case("far positions", {"batch": 1, "seq": 2, "past": 3, "keep": 2}, position_offset=max(0, ctx - 8)),
        ),
        tolerances={"fp32": Tolerance(max_abs=1e-4), "fp16": Tolerance(min_cosine=0.999)},
        wrap=InPlaceCacheDecoderGraph if in_place_cache else DecoderGraph,
    )


def graph_specs(config: FastSLMConfig, decoder_cache: str = COPIED) -> list[GraphSpec]:
    """The graphs of a bundle whose decoder keeps its KV cache `decoder_cache` (runtime/bundle.py DECODER_CACHES)."""
    return [audio_tower_spec(config), llm_spec(config, in_place_cache=decoder_cache == IN_PLACE)]
