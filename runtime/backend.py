"""What every execution backend provides: the two FastSLM stages with numpy at the edges.

The generate loop, prompt building, sampling and detokenization are written once (in
`fastslm.runtime.generate`) against this protocol; the PyTorch reference, ONNX Runtime and
TensorRT each implement it. The KV cache stays in whatever form the backend keeps it
(torch tensors, numpy arrays, device buffers) inside a `KVCache` value.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .kv_cache import KVCache


class Backend(Protocol):
    name: str
    n_mels: int  # mel bins the audio tower expects
    tokens_per_window: int  # speech tokens per 30 s window
    hidden_size: int  # LLM width
    max_windows_per_batch: int  # audio-tower batch limit (memory / engine profile)
    max_context: int  # LLM positions it can hold: prompt + speech tokens + answer

    def encode_windows(self, mel: np.ndarray) -> np.ndarray:
        """mel (W, n_mels, 3000) float32 -> speech tokens (W, tokens_per_window, hidden_size) float32."""
        ...

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """token ids (T,) int64 -> embeddings (T, hidden_size) float32."""
        ...

    def empty_cache(self) -> KVCache:
        """A zero-length KV cache for one sequence."""
        ...

    def decode(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run the LLM over embeds (T, hidden_size) after `cache`.

        Returns the logits of the last position (vocab,) float32 and the cache extended by T
        positions. `cache` itself is not modified, so a prefix cache can be reused.
        """
        ...
