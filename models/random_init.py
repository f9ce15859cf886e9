"""A FastSLM model folder with random weights at the published shapes, written without a full copy in memory.

    fastslm-convert --random-init published --out DIR [--llm-layers N] [--encoder-layers N]

The published weights cannot be downloaded everywhere, but their shapes are public
(Whisper large-v3's encoder, the HFQ-Former at width 1280, Qwen3-4B): random weights of those
shapes exercise every size limit of export, quantization and runtime. Fewer layers keep every
width and the full 151,936-row vocabulary for quick checks.

Each tensor is drawn directly in the stored dtype from its own generator, seeded from the
model seed and the tensor's name, so a tensor's values do not depend on the layer count or on
the order of writing, and nothing is ever held in fp32. Tensors go to safetensors shards of at
most `shard_bytes` (with Hugging Face's model.safetensors.index.json), one shard in memory at a time.

Scales keep activations near unit size through every layer: Linear / Conv weights
N(0, 1/fan_in), norms 1 and biases 0, learned queries and the (tied) embedding table N(0, 0.02).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..runtime.output_folder import with_new_file_mode
from .fastslm import FastSLM, FastSLMConfig, _derived_keys
from .hfq_former import HFQFormerDims
from .qwen3 import Qwen3Dims
from .whisper_encoder import WhisperEncoderDims

PRESETS = ("published",)
SHARD_BYTES = 2 * 2**30
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
# Instructions of the prompt format, so the random model's tokenizer encodes the real prompts in few tokens.
_TOKENIZER_TEXTS = (
    "Transcribe this audio clip into text.",
    "Translate this audio clip into English.",
    "Summarize this audio clip.",
    "Answer the question about this audio clip.",
    "and so my fellow americans ask not what your country can do for you",
)


def published_config(llm_layers: int | None = None, encoder_layers: int | None = None) -> FastSLMConfig:
    """The published FastSLM's shapes (ARCHITECTURE.md), optionally with fewer layers."""
    whisper, qwen = WhisperEncoderDims(), Qwen3Dims.qwen3_4b()
    if encoder_layers is not None:
        whisper = replace(whisper, n_layers=encoder_layers)
    if llm_layers is not None:
        qwen = replace(qwen, num_layers=llm_layers)
    layers = f" ({whisper.n_layers} encoder + {qwen.num_layers} LLM layers)"
    return FastSLMConfig(
        whisper=whisper,
        hfq_former=HFQFormerDims(),
        qwen3=qwen,
        name="fastslm-published-random",
        description="random weights at the published FastSLM shapes" + layers,
    )


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The value of one named weight (see the module docstring for the scales)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # LayerNorm / RMSNorm weights
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    if "embed_tokens" in name or leaf == "query":
        std = 0.02
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        std = fan_in**-0.5
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def stored_shapes(config: FastSLMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model folder stores (derived buffers and the tied head left out)."""
    with torch.device("meta"):
        model = FastSLM(config)
    derived = set(_derived_keys(model))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in derived}


def write_random_model(
    folder: Path, config: FastSLMConfig, *, seed: int = 0, dtype: torch.dtype = torch.float16,
    shard_bytes: int = SHARD_BYTES, progress: Callable[[int], None] | None = None,
) -> int:
    """Write config.json, shards + index and tokenizer.json into `folder`; returns the weights' bytes."""
    from safetensors.torch import save_file

    from ..runtime.tokenizer import train_bpe_tokenizer
    from ..runtime.bundle import CONFIG_FILE, MODEL_FORMAT, TOKENIZER_FILE, WEIGHTS_INDEX_FILE

    folder.mkdir(parents=True, exist_ok=True)
    shapes = stored_shapes(config)
    size = torch.tensor([], dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():  # shard plan first: the index names every shard's final file
        n = size * torch.Size(shape).numel()
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        shard = SHARD_NAME.format(index=i, total=len(groups))
        tensors = {}
        for name in names:
            tensors[name] = random_tensor(name, shapes[name], dtype, seed)
            weight_map[name] = shard
            total += tensors[name].numel() * size
            if progress is not None:
                progress(tensors[name].numel() * size)
        save_file(tensors, str(folder / shard), metadata={"format": MODEL_FORMAT})
        with_new_file_mode(folder / shard)  # safetensors writes owner-only files; a model folder is shared
        del tensors
    index = {"metadata": {"total_size": total, "seed": seed, "dtype": str(dtype).removeprefix("torch.")},
             "weight_map": weight_map}  # fmt: skip
    (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tokenizer = train_bpe_tokenizer(list(_TOKENIZER_TEXTS) * 4, vocab_size=400)
    if tokenizer.get_vocab_size() > config.qwen3.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.get_vocab_size()} ids exceed the model's vocabulary")
    tokenizer.save(str(folder / TOKENIZER_FILE))
    return total


def weight_bytes(config: FastSLMConfig, dtype: torch.dtype = torch.float16) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(torch.Size(s).numel() for s in stored_shapes(config).values()) * size
