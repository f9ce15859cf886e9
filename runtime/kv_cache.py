"""The LLM's key/value cache as an explicit value.

One object for every backend: the PyTorch reference keeps torch tensors in it, ONNX Runtime
numpy arrays, TensorRT device buffers. It is a plain value so that callers can keep the
cache of an audio prefix, copy it to ask several questions about the same audio, or save it
to disk and load it in another process.

Layout per layer: keys and values shaped (batch, n_kv_heads, length, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError


def _copy_array(array: Any) -> Any:
    # torch tensors have clone(); numpy arrays and most device-array types have copy().
    return array.clone() if hasattr(array, "clone") else array.copy()


def _nbytes(array: Any) -> int:
    if hasattr(array, "nbytes"):  # numpy, torch
        return int(array.nbytes)
    return int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize  # device tensors with a numpy dtype


@dataclass
class KVCache:
    keys: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    # The buffers these arrays are views of, when a backend keeps the cache in place (runtime/kv_buffers.py).
    buffers: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(f"KVCache has {len(self.keys)} key layers but {len(self.values)} value layers")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Number of cached positions (0 for an empty cache)."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes its keys and values hold (numpy, torch and device tensors alike)."""
        return sum(_nbytes(a) for a in self.keys + self.values)

    def copy(self) -> "KVCache":
        return KVCache([_copy_array(k) for k in self.keys], [_copy_array(v) for v in self.values])

    def to_numpy(self) -> "KVCache":
        def as_np(a: Any) -> np.ndarray:
            return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)

        return KVCache([as_np(k) for k in self.keys], [as_np(v) for v in self.values])

    def save(self, path: str | Path) -> None:
        arrays = self.to_numpy()
        payload = {f"key_{i}": k for i, k in enumerate(arrays.keys)}
        payload.update({f"value_{i}": v for i, v in enumerate(arrays.values)})
        np.savez(path, **payload)

    @classmethod
    def load(cls, path: str | Path) -> "KVCache":
        try:
            with np.load(path) as data:
                n = sum(1 for name in data.files if name.startswith("key_"))
                return cls([data[f"key_{i}"] for i in range(n)], [data[f"value_{i}"] for i in range(n)])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"cannot read KV cache {path}: {exc}; save it again with KVCache.save") from None
