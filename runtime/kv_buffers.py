"""A KV cache kept in place: per-layer buffers with room to grow, handed out as `KVCache` views.

ONNX Runtime's decoder graph (export/graphs.py, InPlaceCacheDecoderGraph) appends each step's
keys and values to a buffer it is given as both past and present, so a step no longer copies
the whole cache (at 6,000 positions of the published size that copy was half a decode step).
The caches handed out stay plain values: their arrays are views of the buffers' first rows,
and a step only writes rows past the newest view's length. A cache that is not the newest view
of these buffers (an older one kept to ask another question, or one loaded from disk) is copied
into new buffers first, so no view a caller holds ever changes.
"""

from __future__ import annotations

import numpy as np

from .kv_cache import KVCache

GROW_ROWS = 256  # capacities are multiples of this; a full buffer grows to twice its rows


class KVBuffers:
    """Keys and values per layer, (batch, kv_heads, capacity, head_dim) each; `filled` rows hold the newest cache."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: np.dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        # np.empty: pages are touched (resident) only as rows are written.
        self.keys = [np.empty(shape, dtype) for _ in range(layers)]
        self.values = [np.empty(shape, dtype) for _ in range(layers)]
        self.filled = 0

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def holds(self, cache: KVCache) -> bool:
        """Whether `cache` is the newest view of these buffers (then the next step may append in place)."""
        return (
            cache.num_layers == len(self.keys) and cache.length == self.filled and cache.length > 0
            and all(a.base is b for a, b in zip(cache.keys + cache.values, self.keys + self.values))
        )  # fmt: skip

    def view(self, length: int) -> KVCache:
        self.filled = length
        return KVCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values], buffers=self)

    @classmethod
    def for_step(cls, cache: KVCache, new_rows: int, max_rows: int, kv_heads: int, head_dim: int,
                 dtype: np.dtype) -> "KVBuffers":  # fmt: skip
        """Buffers that hold `cache` in their first rows with room for `new_rows` more: its own when they can."""
        need = cache.length + new_rows
        current = cache.buffers if isinstance(cache.buffers, KVBuffers) and cache.buffers.holds(cache) else None
        if current is not None and need <= current.capacity and current.keys[0].dtype == dtype:
            return current
        batch = cache.keys[0].shape[0] if cache.num_layers else 1
        grown = 2 * current.capacity if current is not None else need
        capacity = -(-max(need, min(grown, max_rows)) // GROW_ROWS) * GROW_ROWS
        buffers = cls(cache.num_layers, batch, kv_heads, head_dim, capacity, dtype)
        for old, new in zip(cache.keys + cache.values, buffers.keys + buffers.values):
            new[:, :, : cache.length] = old
        buffers.filled = cache.length
        return buffers
