"""ONNX Runtime backend: the runtime `Backend` protocol over an exported bundle, numpy in and out.

Two sessions: the audio tower (run on batches of at most `max_windows_per_batch` windows, so
memory stays bounded by the batch) and the KV-cache decoder (one graph for prefill and
decode). The KV cache is a `KVCache` of numpy arrays in the dtype the graph declares for its
`past_key_values.*` inputs (the bundle's precision). Graphs with a `past_length` input (exported
since the cache is kept in place) get one buffer per layer as both past and present through IO
binding, and append each step's rows to it (runtime/kv_buffers.py); graphs without it (the copied
form, which every onnxruntime loads, and bundles from before) get the previous step's `present.*`
outputs back, which their graph copies into the next step's.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import AUDIO_TOWER, COPIED, LLM, Bundle, kv_input_name, kv_output_name, load_bundle
from .errors import ModelFileError, ModelWarning, OptionError
from .kv_buffers import KVBuffers
from .kv_cache import KVCache

# Fastest first. TensorRT and CUDA come with onnxruntime-gpu (the [gpu] extra, instead of [cpu]).
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}  # fmt: skip

PREFILL_CHUNK = 512  # prompt positions per LLM call (see OnnxBackend.decode)
PAST_LENGTH = "past_length"  # the LLM graph's input when its attention keeps the cache in place
# The first onnxruntime release that loads that graph (GroupQueryAttention with past_length and its
# newer optional inputs): 1.20.0, 1.21.1, ..., 1.31.1 were each measured to refuse it at load.
IN_PLACE_CACHE_ONNXRUNTIME = "1.32"
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_MANIFEST_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def resolve_providers(requested: Sequence[str] | str | None = None) -> list[str]:
    """The execution providers to use: the best available ones, or the user's list (aliases allowed)."""
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in PROVIDER_PREFERENCE if p in available]
    if isinstance(requested, str):
        requested = [p for p in requested.split(",") if p.strip()]
    chosen = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in requested]
    if not chosen:
        raise OptionError("the provider list is empty: name at least one, e.g. CPUExecutionProvider")
    for p in chosen:
        if p not in available:
            hint = (" (switch to the CUDA build, onnxruntime-gpu: pip uninstall -y onnxruntime && pip install 'fastslm[gpu]')"
                    if p in PROVIDER_PREFERENCE[:2] else "")
            raise OptionError(f"execution provider {p} is not available here{hint}; available: {', '.join(available)}")
    return chosen


def loads_in_place_cache(version: str) -> bool:
    """Whether onnxruntime `version` ("1.31.1", "1.32.0.dev20261101") loads the in-place decoder graph."""
    def release(v: str) -> tuple[int, ...] | None:
        found = re.match(r"(\d+)\.(\d+)", v)
        return tuple(map(int, found.groups())) if found else None

    found = release(version)  # an unreadable version string: try, and let onnxruntime's own error speak
    return found is None or found >= release(IN_PLACE_CACHE_ONNXRUNTIME)


def in_place_cache_refused(bundle: Bundle) -> str:
    """The error line for an in-place bundle on an older onnxruntime: the export command that makes one it loads."""
    from .loading import DEFAULT_MODEL_FOLDER, SHIPPED_DIR

    shipped = bundle.path.resolve().parent == SHIPPED_DIR.resolve()
    model = DEFAULT_MODEL_FOLDER if shipped else "MODEL_FOLDER"
    where = "" if shipped else f" (MODEL_FOLDER: the {bundle.model_name} model folder it was exported from)"
    return (
        f"onnxruntime {ort.__version__} cannot load {bundle.path}: its decoder keeps the KV cache in place, which "
        f"needs onnxruntime >= {IN_PLACE_CACHE_ONNXRUNTIME}; make a bundle this onnxruntime loads with `fastslm-export --model {model} "
        f"--target {bundle.manifest.get('target', 'onnx')} --decoder-cache {COPIED} --out {bundle.path.name}-{COPIED}`"
        f"{where}"
    )


def session_options(
    precision: str, providers: Sequence[str], threads: int | None = None, exact_int8: bool = True
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if precision == "fp16" and providers[0] == "CPUExecutionProvider":
        # onnxruntime 1.32 on CPU segfaults while creating sessions for fp16 graphs at
        # ORT_ENABLE_ALL (measured, TOOLCHAIN.md); the EXTENDED fusions are safe and give the
        # same numbers. A crash would take the user's whole process down, so never risk it.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # The CPU has no fp16 kernels for most ops, so ONNX Runtime casts each fp16 weight to fp32 at run
        # time. In the default order a Cast with no activation input runs at the start of the graph and
        # its output lives until the layer that reads it: every weight's fp32 copy at once, 1.5x the
        # graph's bytes (the published-size decoder: 11 GB more than its 8 GB of weights; the trt-fp16
        # export died for memory). Priority order runs each Cast just before its reader: one copy at a time.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = int(threads)
    # INT8 graphs: ONNX Runtime's default x86 kernels multiply uint8 by int8 with vpmaddubsw, which
    # saturates int16 pair sums on CPUs without VNNI (AVX2-only: the demo audio tower's WER +2.6 points).
    # This rewrites the int8 weights to uint8 for the U8U8 kernels, which widen to 16 bits first: the
    # same integers, exact on every x86 CPU (calibration/qdq.py). Graphs without Q/DQ are untouched;
    # INT8 bundles exported before their weights had zero points cannot take it (exact_int8=False).
    options.add_session_config_entry("session.x64quantprecision", "1" if exact_int8 else "0")
    options.log_severity_level = 3  # ORT's warnings (unused initializers, ...) mean nothing to a user
    return options


def tensorrt_profile(graph: dict[str, Any]) -> dict[str, str]:
    """TensorRT EP options that fix one optimization profile from the manifest's min/opt/max dims.

    Without them the EP builds an engine for the first shapes it sees and rebuilds whenever a
    new shape falls outside, i.e. at every decode step as the past grows.
    """
    def shapes(which: str) -> str:
        parts = []
        for t in graph["inputs"]:
            dims = [str(graph["dims"][d][which]) if isinstance(d, str) else str(d) for d in t["shape"]]
            parts.append(f"{t['name']}:{'x'.join(dims)}")
        return ",".join(parts)

    return {"trt_profile_min_shapes": shapes("min"), "trt_profile_opt_shapes": shapes("opt"),
            "trt_profile_max_shapes": shapes("max")}  # fmt: skip


def _trt_cache_dir(bundle: Bundle, graph: str) -> str:
    from .trt_compat import tensorrt_cache_dir

    base = tensorrt_cache_dir()
    key = bundle.manifest["files"][bundle.graph(graph)["file"]]["sha256"][:16]
    return str(base / key)


class OnnxBackend:
    name = "onnx"

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: Sequence[str] | str | None = None,
        max_windows_per_batch: int = 4,
        threads: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        lazy_llm: bool = False,
    ):
        """`lazy_llm`: open the LLM's session at its first use, not here (an exporter checking only the audio tower)."""
        if not isinstance(max_windows_per_batch, int) or max_windows_per_batch < 1:
            raise OptionError(f"max_windows_per_batch {max_windows_per_batch!r} is invalid: use a whole number >= 1")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise OptionError(f"prefill_chunk {prefill_chunk!r} is invalid: use a whole number >= 1")
        self.prefill_chunk = prefill_chunk
        self.bundle = bundle
        dims = bundle.dims
        self.n_mels = dims.n_mels
        self.tokens_per_window = dims.tokens_per_window
        self.hidden_size = dims.hidden_size
        self.num_layers = dims.num_layers
        self.max_context = dims.max_position_embeddings
        self.max_windows_per_batch = max_windows_per_batch
        self.providers = resolve_providers(providers)
        if bundle.int8_weights_lack_zero_points and self.providers[0] == "CPUExecutionProvider":
            warnings.warn(ModelWarning(
                f"{bundle.path} is an INT8 bundle from an older fastslm: on CPUs without VNNI (AVX2 only) its audio "
                f"tower can lose accuracy; re-export it with fastslm-export to compute INT8 exactly on every CPU"
            ), stacklevel=3)  # fmt: skip
        # From the manifest, which _check_io holds the graph to when its session opens.
        llm_inputs = {t["name"]: _MANIFEST_DTYPES.get(t["dtype"]) for t in bundle.graph(LLM)["inputs"]}
        self._kv_dtype = _NUMPY_DTYPES[llm_inputs[kv_input_name(0, "key")]]
        kv_outputs = [kv_output_name(i, kind) for i in range(self.num_layers) for kind in ("key", "value")]
        self._llm_outputs = ["logits", *kv_outputs]
        self._takes_past_length = PAST_LENGTH in llm_inputs
        if self._takes_past_length and not loads_in_place_cache(ort.__version__):
            raise ModelFileError(in_place_cache_refused(bundle))  # onnxruntime's own refusal names only an op
        self._audio = self._session(AUDIO_TOWER, threads)
        self._threads = threads
        self._llm_session = None if lazy_llm else self._session(LLM, threads)
        # Such a graph also takes exact-length past tensors (and copies them into its present outputs).
        self.cache_in_place = self._takes_past_length
        try:
            # Memory-mapped: the 0.8 GB fp16 table of the real model is paged in row by row as used.
            self._embed = np.load(bundle.embeddings_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read {bundle.embeddings_path} ({exc}); re-export the bundle") from None

    @classmethod
    def from_bundle(cls, path: str | Path, *, verify: bool = True, **options) -> "OnnxBackend":
        return cls(load_bundle(path, runtime="onnx", verify=verify), **options)

    # ---- sessions ------------------------------------------------------------------------

    @property
    def _llm(self) -> ort.InferenceSession:
        if self._llm_session is None:
            self._llm_session = self._session(LLM, self._threads)
        return self._llm_session

    def _session(self, graph: str, threads: int | None) -> ort.InferenceSession:
        path = self.bundle.graph_path(graph)
        providers: list[Any] = list(self.providers)
        if providers[0] == "TensorrtExecutionProvider":
            options = tensorrt_profile(self.bundle.graph(graph))
            options.update(trt_engine_cache_enable="True", trt_engine_cache_path=_trt_cache_dir(self.bundle, graph))
            providers[0] = (providers[0], options)
        extra = {}
        if self.bundle.graph(graph).get("precision", self.bundle.precision) == "int8":
            # Common-subexpression elimination merges the QuantizeLinear nodes that feed several
            # MatMuls, after which ORT's QDQ fusion no longer matches them: with it on, 23 of 45
            # MatMuls of the demo audio tower run int8 kernels, without it 45 (1.20x -> 1.40x).
            extra["disabled_optimizers"] = ["CommonSubexpressionElimination"]
        exact = not self.bundle.int8_weights_lack_zero_points
        try:
            session = ort.InferenceSession(
                str(path), session_options(self.bundle.precision, self.providers, threads, exact), providers=providers,
                **extra,
            )  # fmt: skip
        except Exception as exc:  # onnxruntime raises its own exception types for unloadable graphs
            reason = " ".join(str(exc).split())[:300]
            raise ModelFileError(
                f"onnxruntime {ort.__version__} cannot load {path} ({reason}); re-export the bundle with this version"
            ) from None
        self._check_io(graph, session)
        return session

    @staticmethod
    def _input_types(session: ort.InferenceSession) -> dict[str, str]:
        return {t.name: t.type for t in session.get_inputs()}

    def _check_io(self, graph: str, session: ort.InferenceSession) -> None:
        """The graph file must have the names and dtypes the manifest declares (a swapped file would not)."""
        declared = self.bundle.graph(graph)
        found = {t.name: t for t in list(session.get_inputs()) + list(session.get_outputs())}
        for t in declared["inputs"] + declared["outputs"]:
            got = found.get(t["name"])
            if got is None or got.type != _MANIFEST_DTYPES.get(t["dtype"]):
                raise ModelFileError(
                    f"{self.bundle.graph_path(graph)} has {t['name']} as {got.type if got else 'nothing'}, the manifest "
                    f"says {t['dtype']}: the graph comes from another bundle; re-export it"
                )
            # Static sizes too (the manifest's were checked against config.json): a graph of another width would
            # load and then fail inside onnxruntime with a shape traceback.
            shape = list(got.shape)
            if len(shape) != len(t["shape"]) or any(
                isinstance(d, int) and isinstance(g, int) and d != g for d, g in zip(t["shape"], shape)
            ):
                raise ModelFileError(
                    f"{self.bundle.graph_path(graph)} has {t['name']} shaped {shape}, the manifest says {t['shape']}: "
                    "the graph comes from another model; re-export the bundle"
                )

    # ---- the Backend protocol -------------------------------------------------------------

    def encode_windows(self, mel: np.ndarray) -> np.ndarray:
        """mel (W, n_mels, 3000) -> speech tokens (W, tokens_per_window, hidden_size) float32."""
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        batch = self.max_windows_per_batch
        parts = [self._audio.run(["speech_tokens"], {"mel": mel[i : i + batch]})[0] for i in range(0, len(mel), batch)]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._embed[np.asarray(ids, dtype=np.int64)], dtype=np.float32)  # (T, H)

    def empty_cache(self) -> KVCache:
        shape = (1, self.bundle.dims.num_kv_heads, 0, self.bundle.dims.head_dim)
        def empty() -> list[np.ndarray]:
            return [np.zeros(shape, self._kv_dtype) for _ in range(self.num_layers)]

        return KVCache(empty(), empty())

    def decode(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Logits after the last of `embeds` (T, H); a long prompt runs in chunks of `prefill_chunk` positions.

        The graph's attention materialises (heads, T, past + T) scores: one call over an hour of
        audio (6,000 positions, 32 heads) would hold 4.6 GB of them, a 512-position chunk 0.4 GB.
        """
        last = np.array([min(len(embeds), self.prefill_chunk) - 1], dtype=np.int64)
        while len(embeds) > self.prefill_chunk:
            _, cache = self.run_llm(embeds[: self.prefill_chunk], cache, last)
            embeds = embeds[self.prefill_chunk :]
        logits, cache = self.run_llm(embeds, cache, np.array([len(embeds) - 1], dtype=np.int64))
        return logits[-1], cache

    def decode_rows(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """`decode` for B sequences at once: embeds (B, T, H) after a cache of B rows -> logits (B, vocab), cache.

        The graph has no padding mask, so the rows must be equally long (same past, same T); then
        no row sees another's positions and each row's numbers are those of decoding it alone
        (tests/test_transcribe.py checks the tokens). One call per step for B rows instead of B
        calls: the demo LLM is small enough that per-call overhead, not arithmetic, sets its speed.
        """
        embeds = np.asarray(embeds)
        last = np.array([min(embeds.shape[1], self.prefill_chunk) - 1], dtype=np.int64)
        while embeds.shape[1] > self.prefill_chunk:
            _, cache = self._run(embeds[:, : self.prefill_chunk], cache, last)
            embeds = embeds[:, self.prefill_chunk :]
        logits, cache = self._run(embeds, cache, np.array([embeds.shape[1] - 1], dtype=np.int64))
        return logits[:, -1], cache

    def run_llm(
        self, embeds: np.ndarray, cache: KVCache, logits_index: np.ndarray | None = None
    ) -> tuple[np.ndarray, KVCache]:
        """embeds (T, H) after `cache` -> logits (K, vocab) float32 at `logits_index` (default: all T) and the new cache."""
        logits, cache = self._run(np.asarray(embeds)[None], cache, logits_index)
        return logits[0], cache

    def _run(self, embeds: np.ndarray, cache: KVCache, logits_index: np.ndarray | None) -> tuple[np.ndarray, KVCache]:
        """embeds (B, T, H) after a cache of B rows -> logits (B, K, vocab) and the new cache."""
        B, T = embeds.shape[:2]
        past = cache.length
        if logits_index is None:
            logits_index = np.arange(T, dtype=np.int64)
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),  # (B, T, H)
            "position_ids": np.broadcast_to(np.arange(past, past + T, dtype=np.int64), (B, T)).copy(),  # (B, T)
            "logits_index": np.asarray(logits_index, dtype=np.int64),  # (K,)
        }
        if self._takes_past_length:
            feeds[PAST_LENGTH] = np.full(B, past, dtype=np.int64)
        if self.cache_in_place:
            return self._run_in_place(feeds, cache, T)
        for i in range(self.num_layers):
            feeds[kv_input_name(i, "key")] = cache.keys[i]
            feeds[kv_input_name(i, "value")] = cache.values[i]
        logits, *present = self._llm.run(self._llm_outputs, feeds)
        return logits, KVCache(present[0::2], present[1::2])

    def _run_in_place(self, feeds: dict[str, np.ndarray], cache: KVCache, new_rows: int) -> tuple[np.ndarray, KVCache]:
        dims = self.bundle.dims
        buffers = KVBuffers.for_step(cache, new_rows, self.max_context, dims.num_kv_heads, dims.head_dim, self._kv_dtype)
        return run_in_place(self._llm, feeds, buffers, cache.length + new_rows)


def run_in_place(session: ort.InferenceSession, feeds: dict[str, np.ndarray], buffers: KVBuffers,
                 length: int) -> tuple[np.ndarray, KVCache]:  # fmt: skip
    """One decoder call with each layer's buffer bound as its past and its present: the graph writes the new rows only.

    `feeds` holds every input but the cache; returns the logits and the cache of `length` rows.
    """
    binding = session.io_binding()
    binding.bind_output("logits", "cpu")
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    dtype = buffers.keys[0].dtype.type
    for i, (key, value) in enumerate(zip(buffers.keys, buffers.values)):
        for kind, array in (("key", key), ("value", value)):
            shape, address = list(array.shape), array.ctypes.data
            binding.bind_input(kv_input_name(i, kind), "cpu", 0, dtype, shape, address)
            binding.bind_output(kv_output_name(i, kind), "cpu", 0, dtype, shape, address)
    session.run_with_iobinding(binding)
    logits = binding.get_outputs()[0].numpy()
    return logits, buffers.view(length)
