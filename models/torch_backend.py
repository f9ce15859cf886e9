"""The PyTorch reference model behind the runtime's `Backend` protocol.

With it, `fastslm-run --backend torch` runs a model folder through exactly the same
prompt builder, generate loop and sampler as the exported backends, so any difference
between backends is a difference in the model computation alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime.kv_cache import KVCache
from .fastslm import FastSLM


class TorchBackend:
    name = "torch"

    def __init__(self, model: FastSLM, *, max_windows_per_batch: int = 4, threads: int | None = None):
        self.model = model.eval()
        config = model.config
        self.n_mels = config.n_mels
        self.tokens_per_window = config.tokens_per_window
        self.hidden_size = config.qwen3.hidden_size
        self.max_windows_per_batch = max_windows_per_batch
        self.max_context = config.qwen3.max_position_embeddings
        self._dtype = next(model.parameters()).dtype
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: str = "fp32", **options) -> "TorchBackend":
        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32  # "auto" = fp32, the reference
        return cls(FastSLM.from_pretrained(folder, dtype=torch_dtype), **options)

    @property
    def precision(self) -> str:
        return "fp16" if self._dtype == torch.float16 else "fp32"

    @torch.inference_mode()
    def encode_windows(self, mel: np.ndarray) -> np.ndarray:
        tokens = self.model.encode_audio(torch.from_numpy(np.ascontiguousarray(mel)).to(self._dtype))
        return tokens.float().numpy()

    @torch.inference_mode()
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.model.llm.embed(torch.from_numpy(ids)).float().numpy()

    def empty_cache(self) -> KVCache:
        return self.model.llm.empty_cache(batch=1, dtype=self._dtype, device=torch.device("cpu"))

    @torch.inference_mode()
    def decode(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        x = torch.from_numpy(np.ascontiguousarray(embeds)).to(self._dtype)[None]  # (1, T, H)
        if any(isinstance(a, np.ndarray) for a in cache.keys + cache.values):  # e.g. a KVCache.load or a saved prefix
            cache = KVCache([torch.from_numpy(np.asarray(k)) for k in cache.keys], [torch.from_numpy(np.asarray(v)) for v in cache.values])
        out = self.model.llm(inputs_embeds=x, past=cache, last_only=True)
        return out.logits[0, -1].float().numpy(), out.past
