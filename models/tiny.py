"""Tiny random FastSLMs: the real architecture at toy sizes, built in a second on a CPU.

Tests, export smoke checks and the TensorRT build checks use them, so every graph the
exporter produces for the 4 B model is also produced, built and compared at this size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.tokenizer import train_bpe_tokenizer
from .fastslm import FastSLM, FastSLMConfig
from .hfq_former import HFQFormerDims
from .qwen3 import Qwen3Dims
from .whisper_encoder import WhisperEncoderDims

TINY_VOCAB = 320  # byte-level BPE: 256 bytes + merges + the chat and FastSLM special tokens

_SENTENCES = (
    "and so my friends ask what you can do",
    "the quick brown fox jumps over the lazy dog",
    "please transcribe this audio clip into text",
    "summarize the meeting in three words",
    "how many words were said in the recording",
    "the first word of the sentence was hello",
    "numbers like one two three and forty two",
    "we choose to go to the moon in this decade",
)


def tiny_config(n_mels: int = 80, vocab_size: int = TINY_VOCAB, llm_dim: int = 64) -> FastSLMConfig:
    return FastSLMConfig(
        whisper=WhisperEncoderDims(n_mels=n_mels, n_ctx=1500, width=128, n_heads=2, n_layers=2),
        hfq_former=HFQFormerDims(
            width=128, n_heads=2, n_frames=1500, stage_queries=(8, 8, 8), n_queries=5, n_out_blocks=2, llm_dim=llm_dim
        ),
        qwen3=Qwen3Dims(
            vocab_size=vocab_size,
            hidden_size=llm_dim,
            intermediate_size=2 * llm_dim,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        name="tiny-random",
        description="random weights at toy sizes, for tests",
    )


def build_tiny_model(
    folder: str | Path, seed: int = 0, config: FastSLMConfig | None = None, varied_llm: bool = False
) -> FastSLM:
    """Write a tiny random model folder (config.json, model.safetensors, tokenizer.json).

    With small random weights the LLM's residual stream is its input embedding, and with tied
    embeddings greedy decoding repeats its last token forever: a weak parity check.
    `varied_llm` gives the LLM unit-scale weights and smaller embeddings instead, so greedy
    answers are several different tokens with clear (but not huge) margins.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(list(_SENTENCES) * 4, vocab_size=TINY_VOCAB)
    config = config or tiny_config(vocab_size=max(TINY_VOCAB, tokenizer.get_vocab_size()))
    torch.manual_seed(seed)
    model = FastSLM(config)
    # Default init leaves the LayerNorm/RMSNorm weights at exactly 1 and biases at 0, which hides
    # mistakes in loading them; randomise every parameter a little.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        if varied_llm:
            g = torch.Generator().manual_seed(seed)
            for name, p in model.llm.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                elif "embed_tokens" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    tokenizer.save(str(folder / "tokenizer.json"))
    model.save_pretrained(folder)
    return model.eval()
