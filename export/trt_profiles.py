"""TensorRT optimization profiles for the FastSLM graphs, computed from the model's sizes.

A profile is a name and a min/opt/max range per symbolic dim ("windows", "seq", "past", ...);
the min/opt/max shape of every engine input follows by putting those ranges into the input's
declared shape (the bundle manifest's `[symbol or size, ...]`). So the tables below are the
whole story, and the builder and the runtime both read them:

    audio_tower   windows   1 .. N                    N = --trt-max-windows, default fitted to the device memory
    llm prefill   seq 1 .. prefill_chunk, past 0 .. max_context - 1, batch 1, keep 1
    llm decode    seq 1,                  past 0 .. max_context - 1, batch 1, keep 1
                  (left out with one_llm_profile: decode then runs on the prefill profile)

The runtime splits a longer prompt into prefill_chunk pieces (TensorRT-LLM's chunked
context), so the prefill activations stay bounded however long the audio is, and keeps
past + seq <= max_context itself. The default max_context holds one hour of audio:
120 windows x tokens_per_window speech tokens + the prompt text + a full answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..runtime.errors import OptionError

HOUR_WINDOWS = 120  # 60 min / 30 s windows
PROMPT_TEXT_TOKENS = 256  # chat template, task token and instruction around the speech tokens
ANSWER_TOKENS = 512  # the reference's max_new_tokens
DEFAULT_PREFILL_CHUNK = 1024
MAX_DEFAULT_WINDOWS = 16  # past ~16 windows a batch the audio tower is compute-bound anyway
ASSUMED_DEVICE_MEMORY = 8 << 30  # when building without a GPU (TensorRT for RTX): a Jetson Orin Nano / 8 GB card
AUDIO_MEMORY_SHARE = 0.25  # of device memory for audio-tower activations; the rest holds weights and the KV cache
# Host memory a TensorRT for RTX 1.7 build of the LLM engine takes per byte of its graph's
# weights, per optimization profile (each profile holds its own copy of the decoder's weights).
# Fitted to the published widths at 1 and 8 layers (docs/SCALE.md): two profiles 3.76 and 10.37 GB
# peak RSS for 0.98 and 2.39 GB of fp16 weights, one profile 3.36 and 7.20 GB (17.09 GB measured
# at 36 layers, 8.09 GB, where this projects 21.8: it errs high).
BUILD_BYTES_PER_WEIGHT_BYTE = {1: 2.7, 2: 4.7}


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise OptionError(f"profile range {self.min}/{self.opt}/{self.max} must satisfy 0 <= min <= opt <= max")

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    name: str
    dims: Mapping[str, DimRange]

    def shapes(self, inputs: Iterable[tuple[str, Sequence[int | str]]]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape per input; `inputs` are (name, declared shape) pairs."""
        out = {}
        for name, shape in inputs:
            rows = []
            for pick in ("min", "opt", "max"):
                row = []
                for d in shape:
                    if isinstance(d, str):
                        if d not in self.dims:
                            raise OptionError(
                                f"input {name} has dim {d!r}, which profile {self.name!r} does not set "
                                f"(it sets {', '.join(sorted(self.dims))}); the graph is not the one these profiles are for"
                            )
                        row.append(getattr(self.dims[d], pick))
                    else:
                        row.append(int(d))
                rows.append(tuple(row))
            out[name] = tuple(rows)
        return out

    def to_dict(self, inputs: Iterable[tuple[str, Sequence[int | str]]]) -> dict:
        return {
            "name": self.name,
            "dims": {k: v.as_list() for k, v in self.dims.items()},
            "shapes": {n: [list(s) for s in rows] for n, rows in self.shapes(inputs).items()},
        }


def default_max_context(tokens_per_window: int) -> int:
    """Positions for one hour of audio, the prompt text and a full answer (6768 for FastSLM)."""
    return HOUR_WINDOWS * tokens_per_window + PROMPT_TEXT_TOKENS + ANSWER_TOKENS


def audio_window_bytes(n_ctx: int, width: int, n_heads: int) -> int:
    """Rough activation memory of one window in the audio tower: one layer's fp32 attention
    scores (n_heads x n_ctx^2) plus eight frame-sized fp32 activations. ~240 MB for large-v3."""
    return 4 * (n_heads * n_ctx * n_ctx + 8 * n_ctx * width)


def default_max_windows(window_bytes: int, device_memory: int | None) -> int:
    """Windows per audio-tower batch that fit a quarter of the device memory, 1..16."""
    memory = device_memory or ASSUMED_DEVICE_MEMORY
    return max(1, min(MAX_DEFAULT_WINDOWS, int(memory * AUDIO_MEMORY_SHARE) // max(1, window_bytes)))


def audio_profiles(max_windows: int) -> list[Profile]:
    if max_windows < 1:
        raise OptionError(f"--trt-max-windows must be at least 1, got {max_windows}")
    return [Profile("windows", {"windows": DimRange(1, min(4, max_windows), max_windows)})]


def llm_profiles(max_context: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, one_profile: bool = False) -> list[Profile]:
    """Two profiles, prefill first: TensorRT uses profile 0 unless told otherwise.

    `one_profile` keeps only prefill, whose seq range starts at 1, so it serves decode too. Each
    profile holds its own copy of the decoder's weights in a TensorRT for RTX engine (measured:
    a published-width layer's 0.2 GB twice in the engine with two profiles, once with one), and
    the builder's memory grows with them; docs/SCALE.md has the numbers.
    """
    if max_context < 2:
        raise OptionError(f"--trt-max-context must be at least 2, got {max_context}")
    if not 1 <= prefill_chunk <= max_context:
        raise OptionError(f"--trt-prefill-chunk must be in 1..max context ({max_context}), got {prefill_chunk}")
    one = DimRange(1, 1, 1)
    last = max_context - 1  # the past before the newest position
    prefill = Profile("prefill", {"batch": one, "keep": one, "seq": DimRange(1, min(256, prefill_chunk), prefill_chunk),
                                  "past": DimRange(0, 0, last)})
    if one_profile:
        return [prefill]
    return [prefill, Profile("decode", {"batch": one, "keep": one, "seq": one, "past": DimRange(0, min(1024, last), last)})]


def llm_profile_count(weight_bytes: int, available_bytes: int | None) -> tuple[int, str]:
    """Two LLM profiles where the build fits in `available_bytes` of host memory, else one; and why.

    One profile serves decode on the prefill profile (seq from 1) and keeps the decoder's weights
    once in the engine, so a published-size decoder builds on a 24 GB machine (two would need
    about 37 GB). Unknown memory: two, the faster decode on the GPU.
    """
    two = BUILD_BYTES_PER_WEIGHT_BYTE[2] * weight_bytes
    if available_bytes is None or two <= available_bytes:
        return 2, "default"
    return 1, (f"two profiles would need about {two / 1e9:.1f} GB of host memory to build, "
               f"{available_bytes / 1e9:.1f} GB is available; --trt-two-llm-profiles forces them")


@dataclass(frozen=True)
class ProfilePlan:
    """The profiles of every graph of a bundle, with the numbers they came from."""

    max_windows: int
    max_context: int
    prefill_chunk: int
    max_windows_source: str  # "option", "device <name>", or "assumed 8 GiB device"
    max_context_source: str = "option"  # "option", "1 h of audio", or why the default was clamped
    one_llm_profile: bool = False  # the LLM engine without its decode profile (llm_profiles)

    def for_graph(self, graph: str) -> list[Profile]:
        if graph == "audio_tower":
            return audio_profiles(self.max_windows)
        if graph == "llm":
            return llm_profiles(self.max_context, self.prefill_chunk, self.one_llm_profile)
        raise OptionError(f"no TensorRT profiles are defined for graph {graph!r}")


def plan_profiles(
    *,
    tokens_per_window: int,
    window_bytes: int,
    max_position_embeddings: int,
    max_windows: int | None = None,
    max_context: int | None = None,
    prefill_chunk: int | None = None,
    device_memory: int | None = None,
    device_name: str | None = None,
    one_llm_profile: bool = False,
) -> ProfilePlan:
    if max_windows is not None:
        source = "option"
    else:
        max_windows = default_max_windows(window_bytes, device_memory)
        source = f"device {device_name}" if device_memory else f"assumed {ASSUMED_DEVICE_MEMORY >> 30} GiB device"
    if max_context is None:
        hour = default_max_context(tokens_per_window)
        # A small model (the demo's 8192 positions) cannot hold an hour: serve what it can, and say so.
        max_context = min(hour, max_position_embeddings)
        context_source = "1 h of audio" if hour <= max_position_embeddings else (
            f"default clamped to the model's {max_position_embeddings} positions (1 h of audio needs {hour})"
        )
    else:
        context_source = "option"
    if max_context > max_position_embeddings:
        raise OptionError(
            f"--trt-max-context {max_context} is beyond the model's {max_position_embeddings} positions; pass a smaller one"
        )
    chunk = prefill_chunk or min(DEFAULT_PREFILL_CHUNK, max_context)
    # Validate now, with the option names, rather than at build time.
    audio_profiles(max_windows), llm_profiles(max_context, chunk)
    return ProfilePlan(max_windows, max_context, chunk, source, context_source, one_llm_profile)
