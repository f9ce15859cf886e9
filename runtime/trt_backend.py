"""Native TensorRT backend: the runtime `Backend` protocol over a bundle's engines, no torch.

    engines.json -> check TensorRT version and GPU -> deserialize audio_tower.engine, llm.engine once
    one CUDA stream for both; one scratch allocation shared by both contexts (they never overlap)
    fixed device buffers for the audio batch and the prompt chunk, reused every call
    KV cache: device buffers sized for max_context, handed out by a pool

The decoder graph writes `present = concat(past, new)` to new memory, so each step reads the
cache from one pool buffer per layer and writes the longer cache into another; the old buffer
goes back to the pool when the old `KVCache` is dropped (or stays, if the caller keeps it as a
reusable prefix). Only the logits of the last position come back to the host. Prompts longer
than the prefill profile run in chunks; single tokens use the decode profile (the prefill
profile, in an engine built with one LLM profile).

Device memory goes through cuda-python (`cuda.bindings.runtime`, `pip install 'fastslm[trt]'`),
which brings its own CUDA runtime, so a GPU driver is all the machine needs besides TensorRT.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .bundle import AUDIO_TOWER, LLM, ModelDims, kv_input_name, kv_output_name, load_bundle
from .errors import FastSLMError, ModelFileError, OptionError
from .kv_cache import KVCache
from .trt_compat import (
    tensorrt_cache_dir,
    FLAVOUR_NAMES,
    EngineMismatchError,
    TensorRTMissingError,
    TrtEnvironment,
    check_engine_manifest,
    current_device,
    import_tensorrt,
    make_logger,
    read_engine_manifest,
    rebuild_hint,
    validity_problem,
)

RUNTIME = "tensorrt"


class GpuError(FastSLMError):
    """No usable GPU, or a CUDA / TensorRT call failed at run time."""


# ---------------------------------------------------------------------------------------------
# Device memory


class Device(Protocol):
    """The few CUDA calls the backend makes; all copies are ordered on one stream."""

    stream: int

    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def h2d(self, ptr: int, host: np.ndarray) -> None: ...
    def d2h(self, host: np.ndarray, ptr: int) -> None: ...
    def d2d(self, dst: int, src: int, nbytes: int) -> None: ...
    def sync(self) -> None: ...


class CudaDevice:
    """cuda-python (cuda.bindings.runtime) on one device and one non-blocking stream."""

    def __init__(self, index: int = 0):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.6
            except ImportError:
                raise TensorRTMissingError("the TensorRT backend needs cuda-python: pip install 'fastslm[trt]'") from None
        self.rt = cudart
        err = cudart.cudaSetDevice(index)[0]
        if int(err) != 0:
            raise GpuError(f"no usable CUDA GPU {index} ({self._describe(err)}); the TensorRT backend needs an NVIDIA GPU, "
                           "use --backend onnx")
        self._stream = self._call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self.stream = int(self._stream)
        k = cudart.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = k.cudaMemcpyHostToDevice, k.cudaMemcpyDeviceToHost, k.cudaMemcpyDeviceToDevice

    def _describe(self, err: Any) -> str:
        return self.rt.cudaGetErrorString(err)[1].decode(errors="replace")

    def _call(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise GpuError(f"CUDA {what} failed: {self._describe(err)}")
        return rest[0] if len(rest) == 1 else None

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(256, nbytes)), f"cudaMalloc of {nbytes >> 20} MiB"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, self._h2d, self._stream), "copy to device")

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, self._d2h, self._stream), "copy to host")

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, self._d2d, self._stream), "device copy")

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self._stream), "stream synchronize")


class _Allocation:
    __slots__ = ("ptr", "nbytes", "__weakref__")

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = ptr, nbytes


class DevicePool:
    """Device buffers handed out as `_Allocation`s and taken back when those are garbage."""

    def __init__(self, device: Device):
        self.device = device
        self.idle: dict[int, list[int]] = {}

    def take(self, nbytes: int) -> _Allocation:
        idle = self.idle.get(nbytes)
        alloc = _Allocation(idle.pop() if idle else self.device.malloc(nbytes), nbytes)
        weakref.finalize(alloc, self._give_back, nbytes, alloc.ptr)
        return alloc

    def _give_back(self, nbytes: int, ptr: int) -> None:
        self.idle.setdefault(nbytes, []).append(ptr)

    def release(self) -> None:
        for ptrs in self.idle.values():
            for ptr in ptrs:
                self.device.free(ptr)
        self.idle.clear()


class DeviceTensor:
    """A contiguous tensor at the start of a device allocation: what a TensorRT KVCache holds.

    `.shape` and `.copy()` make it work in `KVCache`; `np.asarray()` copies it to the host, so
    `KVCache.to_numpy()` and `KVCache.save()` work too.
    """

    def __init__(self, backend: "TrtBackend", alloc: _Allocation, shape: tuple[int, ...], dtype: np.dtype):
        self._backend, self._alloc, self.shape, self.dtype = backend, alloc, tuple(shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return self._alloc.ptr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def copy(self) -> "DeviceTensor":
        if self.nbytes == 0:
            return self  # the shared empty cache: nothing to copy, nothing writes to it
        alloc = self._backend._pool.take(self._alloc.nbytes)
        self._backend._device.d2d(alloc.ptr, self.ptr, self.nbytes)
        return DeviceTensor(self._backend, alloc, self.shape, self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        if host.nbytes:
            self._backend._device.d2h(host, self.ptr)
            self._backend._device.sync()
        return host if dtype is None else host.astype(dtype)


# ---------------------------------------------------------------------------------------------
# One engine with its execution context


class EngineRunner:
    """A deserialized engine, its context, and the three questions the backend asks of it."""

    def __init__(self, trt: Any, engine: Any, context: Any, logger: Any, device: Device, name: str):
        self.trt, self.engine, self.context, self.logger, self.device, self.name = trt, engine, context, logger, device, name
        self.names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        self._profile: int | None = None

    def dtype(self, tensor: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(tensor)))

    def profile_shape(self, tensor: str, profile: int) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(tensor, profile))

    def run(self, profile: int, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        """Enqueue one execution on the device's stream."""
        ctx = self.context
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, self.device.stream):
                self._fail(f"cannot switch to profile {profile}")
            self._profile = profile
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                self._fail(f"rejects {name} shaped {list(shape)}")
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                self._fail(f"rejects the address of {name}")
        if not ctx.execute_async_v3(self.device.stream):
            self._fail("failed to run")

    def _fail(self, what: str) -> None:
        detail = "; ".join(" ".join(m.split()) for m in self.logger.errors[-2:])
        raise GpuError(f"the TensorRT {self.name} engine {what}" + (f" ({detail[:300]})" if detail else ""))


# ---------------------------------------------------------------------------------------------
# The backend


class TrtBackend:
    name = RUNTIME

    def __init__(
        self,
        *,
        device: Device,
        audio: EngineRunner,
        llm: EngineRunner,
        dims: ModelDims,
        embed_table: np.ndarray,
        max_context: int,
        llm_profiles: dict[str, int],
        max_windows_per_batch: int | None = None,
    ):
        self._device, self._audio, self._llm, self._dims = device, audio, llm, dims
        self._pool = DevicePool(device)
        self._embed = embed_table
        self.n_mels, self.tokens_per_window, self.hidden_size = dims.n_mels, dims.tokens_per_window, dims.hidden_size
        self.num_layers, self.max_context = dims.num_layers, max_context

        # audio tower: fixed input/output buffers for the largest batch the engine takes
        engine_windows = audio.profile_shape("mel", 0)[2][0]
        if max_windows_per_batch is not None and not 1 <= max_windows_per_batch <= engine_windows:
            raise OptionError(f"max_windows_per_batch must be 1..{engine_windows} (the engine's profile), "
                              f"got {max_windows_per_batch}")
        self.max_windows_per_batch = max_windows_per_batch or engine_windows
        self._mel_dtype, self._tokens_dtype = audio.dtype("mel"), audio.dtype("speech_tokens")
        w, q, h = self.max_windows_per_batch, dims.tokens_per_window, dims.hidden_size
        self._mel = self._pool.take(w * dims.n_mels * 3000 * self._mel_dtype.itemsize)
        self._tokens = self._pool.take(w * q * h * self._tokens_dtype.itemsize)

        # decoder: profiles by name, a prompt-chunk staging area, one logits row
        if llm.dtype("logits") != np.float32 or audio.dtype("speech_tokens") != np.float32:
            raise ModelFileError("the engines' logits / speech tokens are not float32: they were built from an old "
                                 "bundle; " + rebuild_hint({}))
        if "logits_index" not in llm.names:
            raise ModelFileError("the llm engine has no logits_index input: it was built from an old bundle; "
                                 + rebuild_hint({}))
        # An engine built with one LLM profile (--trt-one-llm-profile) decodes on the prefill profile.
        self._prefill = llm_profiles["prefill"]
        self._decode = llm_profiles.get("decode", self._prefill)
        self.prefill_chunk = llm.profile_shape("inputs_embeds", self._prefill)[2][1]
        self._embeds_dtype, self._kv_dtype = llm.dtype("inputs_embeds"), llm.dtype(kv_input_name(0, "key"))
        self._embeds = self._pool.take(self.prefill_chunk * h * self._embeds_dtype.itemsize)
        self._positions = self._pool.take(self.prefill_chunk * 8)
        self._logits_index = self._pool.take(8)
        self._logits = self._pool.take(dims.vocab_size * 4)
        self._kv_shape = (1, dims.num_kv_heads, max_context, dims.head_dim)
        self._kv_bytes = int(np.prod(self._kv_shape)) * self._kv_dtype.itemsize
        empty = self._pool.take(256)
        self._empty = DeviceTensor(self, empty, (1, dims.num_kv_heads, 0, dims.head_dim), self._kv_dtype)
        # TensorRT for RTX compiles kernels on an engine's first runs; each graph's runtime cache is saved
        # after the first run of each of its profiles, so the next start (a fresh fastslm-run) skips that.
        self._savers: dict[str, Callable[[], None]] = {}
        self._saved: set[tuple[str, int]] = set()
        self._closed = False

    # ---- loading ----------------------------------------------------------------------------

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        verify: bool = True,
        device_index: int = 0,
        max_windows_per_batch: int | None = None,
        runtime_cache: bool = True,
        weight_budget_mib: int | None = None,
    ) -> "TrtBackend":
        """Open a bundle with engines (`fastslm-export --target trt-fp16`) on GPU `device_index`."""
        bundle = load_bundle(path, runtime=RUNTIME, verify=verify)
        manifest = read_engine_manifest(bundle.path)
        trt, flavour = import_tensorrt(manifest.get("tensorrt", {}).get("flavour", "auto"))
        device = CudaDevice(device_index)
        env = TrtEnvironment(flavour, trt.__version__, current_device(device_index))
        check_engine_manifest(manifest, env, where=bundle.path)
        logger = make_logger(trt)
        runtime = trt.Runtime(logger)
        engines = {g: _deserialize(trt, runtime, logger, bundle.path, manifest, g, weight_budget_mib) for g in (AUDIO_TOWER, LLM)}
        contexts, scratch, savers = _contexts(trt, engines, device, bundle.path, manifest if runtime_cache else None)
        runners = {g: EngineRunner(trt, engines[g], contexts[g], logger, device, g) for g in engines}
        try:
            table = np.load(bundle.embeddings_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read {bundle.embeddings_path} ({exc}); re-export the bundle") from None
        profiles = {p["name"]: i for i, p in enumerate(manifest["engines"][LLM]["profiles"])}
        backend = cls(device=device, audio=runners[AUDIO_TOWER], llm=runners[LLM], dims=bundle.dims, embed_table=table,
                      max_context=int(manifest["limits"]["max_context"]), llm_profiles=profiles,
                      max_windows_per_batch=max_windows_per_batch)
        backend._keep = (runtime, scratch)  # the runtime must outlive its engines; the contexts use the scratch
        backend._savers = savers
        backend.bundle = bundle
        return backend

    # ---- the Backend protocol ---------------------------------------------------------------

    def encode_windows(self, mel: np.ndarray) -> np.ndarray:
        """mel (W, n_mels, 3000) -> speech tokens (W, tokens_per_window, hidden_size) float32."""
        mel = np.ascontiguousarray(mel, dtype=self._mel_dtype)
        parts = []
        for start in range(0, len(mel), self.max_windows_per_batch):
            batch = mel[start : start + self.max_windows_per_batch]  # (w, n_mels, 3000)
            self._device.h2d(self._mel.ptr, batch)
            self._audio.run(0, {"mel": batch.shape}, {"mel": self._mel.ptr, "speech_tokens": self._tokens.ptr})
            self._save_after_first_run(AUDIO_TOWER, 0)
            out = np.empty((len(batch), self.tokens_per_window, self.hidden_size), self._tokens_dtype)
            self._device.d2h(out, self._tokens.ptr)
            self._device.sync()  # `batch` and `out` are pageable host memory in use by the copies
            parts.append(out)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._embed[np.asarray(ids, dtype=np.int64)], dtype=np.float32)  # (T, H)

    def empty_cache(self) -> KVCache:
        n = self.num_layers
        return KVCache([self._empty] * n, [self._empty] * n)

    def decode(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        embeds = np.ascontiguousarray(embeds, dtype=self._embeds_dtype)  # (T, H)
        total = cache.length + len(embeds)
        if not len(embeds):
            raise OptionError("decode needs at least one new position")
        if total > self.max_context:
            raise OptionError(
                f"the prompt and answer need {total} positions, the engines hold {self.max_context}: rebuild them with "
                "a larger --trt-max-context, or ask for a shorter answer"
            )
        cache = self._on_device(cache)
        for start in range(0, len(embeds), self.prefill_chunk):
            cache = self._step(embeds[start : start + self.prefill_chunk], cache)
        logits = np.empty(self._dims.vocab_size, np.float32)
        self._device.d2h(logits, self._logits.ptr)
        self._device.sync()
        return logits, cache

    # ---- internals -------------------------------------------------------------------------

    def _step(self, chunk: np.ndarray, cache: KVCache) -> KVCache:
        """Run `chunk` (t, H) after `cache` (P positions); the logits of its last position land in _logits."""
        t, past = len(chunk), cache.length
        positions = np.arange(past, past + t, dtype=np.int64)
        last = np.array([t - 1], dtype=np.int64)
        self._device.h2d(self._embeds.ptr, chunk)
        self._device.h2d(self._positions.ptr, positions)
        self._device.h2d(self._logits_index.ptr, last)
        shapes = {"inputs_embeds": (1, t, self.hidden_size), "position_ids": (1, t), "logits_index": (1,)}
        addresses = {"inputs_embeds": self._embeds.ptr, "position_ids": self._positions.ptr,
                     "logits_index": self._logits_index.ptr, "logits": self._logits.ptr}
        kv_past = (1, self._dims.num_kv_heads, past, self._dims.head_dim)
        kv_present = (1, self._dims.num_kv_heads, past + t, self._dims.head_dim)
        keys, values = [], []
        for i in range(self.num_layers):
            for kind, old, new in (("key", cache.keys[i], keys), ("value", cache.values[i], values)):
                shapes[kv_input_name(i, kind)] = kv_past
                addresses[kv_input_name(i, kind)] = old.ptr
                tensor = DeviceTensor(self, self._pool.take(self._kv_bytes), kv_present, self._kv_dtype)
                addresses[kv_output_name(i, kind)] = tensor.ptr
                new.append(tensor)
        # Copies from pageable host memory return once the data is staged, so the arrays above may go.
        profile = self._decode if t == 1 else self._prefill
        self._llm.run(profile, shapes, addresses)
        self._save_after_first_run(LLM, profile)
        return KVCache(keys, values)

    def _save_after_first_run(self, graph: str, profile: int) -> None:
        if (graph, profile) not in self._saved:
            self._saved.add((graph, profile))
            save = self._savers.get(graph)
            if save is not None:
                save()

    def _on_device(self, cache: KVCache) -> KVCache:
        """A cache of this backend's device tensors; numpy caches (KVCache.load, ONNX) are uploaded."""
        if all(isinstance(a, DeviceTensor) and a._backend is self for a in cache.keys + cache.values):
            return cache
        if cache.num_layers != self.num_layers:
            raise OptionError(f"the KV cache has {cache.num_layers} layers, the model {self.num_layers}")
        want = (1, self._dims.num_kv_heads, cache.length, self._dims.head_dim)

        def upload(array: Any) -> DeviceTensor:
            host = np.ascontiguousarray(np.asarray(array), dtype=self._kv_dtype)
            if host.shape != want:
                raise OptionError(f"a KV cache tensor is shaped {list(host.shape)}, this model needs {list(want)}")
            tensor = DeviceTensor(self, self._pool.take(self._kv_bytes), want, self._kv_dtype)
            self._device.h2d(tensor.ptr, host)
            self._device.sync()
            return tensor

        return KVCache([upload(k) for k in cache.keys], [upload(v) for v in cache.values])

    def close(self) -> None:
        """Save TensorRT for RTX's runtime caches and give back the idle device memory (once)."""
        if self._closed:
            return
        self._closed = True
        for save in self._savers.values():
            save()
        self._device.sync()
        self._pool.release()


# ---------------------------------------------------------------------------------------------
# Loading helpers


def _deserialize(trt: Any, runtime: Any, logger: Any, folder: Path, manifest: dict, graph: str,
                 weight_budget_mib: int | None) -> Any:
    entry = manifest["engines"][graph]
    path = folder / entry["file"]
    hint = rebuild_hint(manifest)
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise ModelFileError(f"engine {path} is missing or not the one engines.json lists; {hint}")
    blob = path.read_bytes()
    problem = validity_problem(trt, runtime, blob)
    if problem:
        raise EngineMismatchError(f"{path}: {FLAVOUR_NAMES[manifest['tensorrt']['flavour']]} says {problem}; {hint}")
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        detail = " ".join(" ".join(logger.errors[-1:]).split())[:300] or "no reason given"
        raise EngineMismatchError(f"cannot load engine {path} ({detail}); {hint}")
    if weight_budget_mib is not None:
        if not engine.streamable_weights_size:
            raise OptionError(f"{path.name} was built without weight streaming; rebuild it with --trt-weight-streaming")
        engine.weight_streaming_budget_v2 = weight_budget_mib << 20
    return engine


def _cache_file(manifest: dict, graph: str) -> Path:
    return tensorrt_cache_dir() / f"{manifest['engines'][graph]['sha256'][:16]}.runtime_cache"


def _contexts(trt: Any, engines: dict[str, Any], device: CudaDevice, folder: Path,
              cache_manifest: dict | None) -> tuple[dict[str, Any], int, dict[str, Callable[[], None]]]:
    """One context per engine, sharing one scratch allocation (they run one after the other on one stream).

    TensorRT for RTX: each context gets a runtime cache of its JIT-compiled kernels, loaded from
    and saved to ~/.cache/fastslm/tensorrt, so the second start skips the compilation.
    """
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    contexts, savers = {}, {}
    for graph, engine in engines.items():
        if hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            if cache_manifest is not None and hasattr(config, "create_runtime_cache"):
                cache, file = config.create_runtime_cache(), _cache_file(cache_manifest, graph)
                if file.is_file():
                    cache.deserialize(file.read_bytes())  # False (ignored) when it is for another GPU or driver
                config.set_runtime_cache(cache)
                savers[graph] = _saver(cache, file)
            contexts[graph] = engine.create_execution_context(config)
        else:
            contexts[graph] = engine.create_execution_context(strategy)
        if contexts[graph] is None:
            raise GpuError(f"TensorRT could not create an execution context for {folder / graph}.engine")
    size = max(int(e.device_memory_size_v2) for e in engines.values())
    scratch = device.malloc(size)
    for context in contexts.values():
        context.set_device_memory(scratch, size)
    return contexts, scratch, savers


def _saver(cache: Any, file: Path):
    def save() -> None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(bytes(memoryview(cache.serialize())))
        except OSError:
            pass  # a cache we cannot write only costs the next start its JIT time

    return save

