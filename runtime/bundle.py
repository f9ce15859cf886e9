"""Exported bundles: the manifest, and checking a bundle before anything runs it.

A bundle is a folder that `fastslm-export` writes and a torch-free backend loads:

    manifest.json        what is in the bundle (schema below), sha256 of every file
    config.json          the model's config (the same file as in the model folder)
    tokenizer.json
    audio_tower.onnx     mel (W, n_mels, 3000) -> speech tokens (W, Q, H)
    llm.onnx             KV-cache decoder; + llm.onnx.data when the graph is over 2 GB
    embed_tokens.npy     the token-embedding table (V, H) in the bundle's precision

manifest.json:

    format, format_version   "fastslm-bundle", BUNDLE_FORMAT_VERSION
    target, runtime          e.g. "onnx-fp16" and the backend that loads it ("onnx")
    precision                "fp32" | "fp16" | "int8" | "int4" (per graph too: graphs.<name>.precision)
    model                    {"name", "config_sha256"}: which model the bundle was made from
    exporter                 {"fastslm", "torch", "onnx", "onnxscript", "onnxruntime", "python", "opset"}
    graphs.<name>            {"file", "data_file" (external weights or null), "precision", "opset",
                              "inputs" / "outputs": [{"name", "dtype", "shape"}] (str = symbolic dim),
                              "dims": {symbol: {"min", "opt", "max"}}, "validation": {...}}
    graphs.llm.decoder_cache "in-place" | "copied" (one of DECODER_CACHES; absent in bundles made before
                             the choice existed, whose form shows only in the past_length input)
    embeddings               {"file", "dtype", "shape"}
    files                    {relative path: {"sha256", "bytes"}} for every file but the manifest

Loading checks, in order: the manifest parses and has our format and version; every listed
file exists with its size and (unless verify=False) its sha256; config.json describes a
fastslm model whose sizes match the graphs' declared inputs and outputs. Each failure is one
`ModelFileError` line that says what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audio import WINDOW_FRAMES
from .errors import ModelFileError

# The file names and formats of everything fastslm writes, in one place (models/, export/ and
# calibration/ import them from here).
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # a model folder's and a bundle's
TOKENIZER_FILE = "tokenizer.json"  # a model folder's and a bundle's
WEIGHTS_FILE = "model.safetensors"  # a model folder's
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights (Hugging Face's layout)
EMBEDDINGS_FILE = "embed_tokens.npy"  # a bundle's token-embedding table
BUNDLE_FORMAT = "fastslm-bundle"
BUNDLE_FORMAT_VERSION = 1
MODEL_FORMAT = "fastslm-model"  # config.json's format (models/fastslm.py writes it)
MODEL_FORMAT_VERSION = 1
CALIBRATION_FILE = "calibration.json"  # a calibration folder's record (calibration/data.py writes it)
CALIBRATION_FORMAT = "fastslm-calibration"
# The manifest's quantization.audio_tower key that says the INT8 weights carry explicit zero points.
INT8_WEIGHT_ZERO_POINTS = "weight_zero_points"

AUDIO_TOWER = "audio_tower"
LLM = "llm"

# How the LLM graph keeps its KV cache (`fastslm-export --decoder-cache`; manifest graphs.llm.decoder_cache):
#   in-place  a `past_length` input, attention by ONNX Runtime's GroupQueryAttention: the backend binds one
#             buffer per layer as both past and present and a step writes only its new rows (onnxruntime >= 1.32)
#   copied    plain past in, present out (past and new concatenated): loads in every ONNX Runtime and TensorRT
IN_PLACE, COPIED = "in-place", "copied"
DECODER_CACHES = (IN_PLACE, COPIED)

_HASH_CHUNK = 1 << 22  # 4 MiB reads keep hashing a 9 GB bundle at disk speed with flat memory


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def kv_input_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def kv_output_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class ModelDims:
    """The sizes the runtime needs, read from config.json without torch."""

    name: str
    n_mels: int
    tokens_per_window: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config: dict[str, Any], source: Path) -> "ModelDims":
        if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:  # valid JSON is not always an object
            raise ModelFileError(f"{source} is not a fastslm model config; re-export the bundle with `fastslm-export`")
        try:
            q = config["qwen3"]
            return cls(
                name=str(config.get("name", "fastslm")),
                n_mels=int(config["whisper"]["n_mels"]),
                tokens_per_window=int(config["hfq_former"]["n_queries"]),
                hidden_size=int(q["hidden_size"]),
                vocab_size=int(q["vocab_size"]),
                num_layers=int(q["num_layers"]),
                num_kv_heads=int(q["num_kv_heads"]),
                head_dim=int(q["head_dim"]),
                max_position_embeddings=int(q["max_position_embeddings"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source} lacks or garbles {exc}; re-export the bundle with `fastslm-export`") from None


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: where it is, its manifest, the model sizes, and config.json as it was read."""

    path: Path
    manifest: dict[str, Any]
    dims: ModelDims
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # empty for a bundle still being written

    @classmethod
    def unpublished(cls, path: Path, graphs: dict[str, Any], precision: str, dims: ModelDims) -> "Bundle":
        """A bundle still being written (an exporter's stage): its graphs, tables and config, no manifest yet.

        What the accuracy gates open to run the candidate before the manifest is hashed.
        """
        manifest = {"graphs": graphs, "precision": precision, "embeddings": {"file": EMBEDDINGS_FILE}, "files": {}}
        return cls(Path(path), manifest, dims)

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def model_name(self) -> str:
        return self.dims.name

    def graph(self, name: str) -> dict[str, Any]:
        return self.manifest["graphs"][name]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name)["file"]

    @property
    def int8_weights_lack_zero_points(self) -> bool:
        """An INT8 audio tower exported before its weights carried explicit zero points: ONNX Runtime's
        exact U8U8 kernels cannot take it (onnx_backend.session_options), so it runs the U8S8 kernels
        that saturate on CPUs without VNNI."""
        record = self.manifest.get("quantization", {}).get("audio_tower")
        return isinstance(record, dict) and not record.get(INT8_WEIGHT_ZERO_POINTS, False)

    @property
    def embeddings_path(self) -> Path:
        return self.path / self.manifest["embeddings"]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


def load_bundle(path: str | Path, runtime: str | None = None, verify: bool = True) -> Bundle:
    """Read and check a bundle; `runtime` ("onnx") is the backend about to load it.

    verify=False skips the sha256 pass (about 5 s for the real 9 GB fp16 bundle on a fast
    disk); sizes are checked either way, which still catches truncated and swapped files.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if runtime is not None and manifest.get("runtime") != runtime:
        raise ModelFileError(
            f"{path} is a {manifest.get('target')!r} bundle for the {manifest.get('runtime')!r} runtime, not {runtime!r}; "
            f"use --backend {manifest.get('runtime')} or export a {runtime} bundle"
        )
    check_files(path, manifest, verify)
    config_path = path / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{config_path} is not valid JSON ({exc}); re-export the bundle") from None
    dims = ModelDims.from_config(config, config_path)
    check_against_config(path, manifest, dims)
    return Bundle(path, manifest, dims, config)


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise ModelFileError(f"{path} has no {MANIFEST_FILE}: it is not an exported bundle; make one with `fastslm-export`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{file} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ModelFileError(f"{file} is not a fastslm bundle manifest; re-export the bundle with `fastslm-export`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} is bundle format version {version}, newer than this fastslm reads ({BUNDLE_FORMAT_VERSION}); "
            "upgrade fastslm or re-export the bundle with this version"
        )
    if version < BUNDLE_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} is bundle format version {version}, older than this fastslm reads ({BUNDLE_FORMAT_VERSION}); "
            "re-export it with `fastslm-export`"
        )
    for key in ("runtime", "precision", "graphs", "embeddings", "files"):
        if key not in manifest:
            raise ModelFileError(f"{file} lacks {key!r}: the manifest is damaged; re-export the bundle")
    check_manifest_structure(manifest, file)
    return manifest


def check_manifest_structure(manifest: dict[str, Any], file: Path) -> None:
    """Every field the loaders read has the type they read it as, and every file name stays in the bundle.

    A hand-edited or forged manifest is then one ModelFileError line, never a TypeError or KeyError
    deep in a backend, and "../../x" can make no loader look outside the bundle folder.
    """

    def need(ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ModelFileError(f"{file}: {where} is not {what}: the manifest is damaged; re-export the bundle")

    def name_in_bundle(value: Any, where: str) -> None:
        need(isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
             and "\x00" not in value, where, "a file name inside the bundle")  # fmt: skip

    def shape(value: Any, where: str) -> None:
        need(isinstance(value, list) and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)
             and d >= 0) for d in value), where, "a list of sizes and symbols")  # fmt: skip

    for key in ("runtime", "precision"):
        need(isinstance(manifest[key], str), key, "a string")
    need(isinstance(manifest.get("model", {}), dict), "model", "an object")
    need(isinstance(manifest["graphs"], dict) and manifest["graphs"], "graphs", "an object of graphs")
    for name, graph in manifest["graphs"].items():
        need(isinstance(graph, dict), f"graphs.{name}", "an object")
        name_in_bundle(graph.get("file"), f"graphs.{name}.file")
        if graph.get("data_file") is not None:
            name_in_bundle(graph["data_file"], f"graphs.{name}.data_file")
        need(isinstance(graph.get("precision", ""), str), f"graphs.{name}.precision", "a string")
        need(isinstance(graph.get("dims", {}), dict), f"graphs.{name}.dims", "an object")
        for side in ("inputs", "outputs"):
            need(isinstance(graph.get(side), list), f"graphs.{name}.{side}", "a list")
            for i, tensor in enumerate(graph[side]):
                where = f"graphs.{name}.{side}[{i}]"
                need(isinstance(tensor, dict) and isinstance(tensor.get("name"), str)
                     and isinstance(tensor.get("dtype"), str), where, "a {name, dtype, shape} object")  # fmt: skip
                shape(tensor.get("shape"), f"{where}.shape")
    embeddings = manifest["embeddings"]
    need(isinstance(embeddings, dict), "embeddings", "an object")
    name_in_bundle(embeddings.get("file"), "embeddings.file")
    need(isinstance(embeddings.get("dtype"), str), "embeddings.dtype", "a string")
    shape(embeddings.get("shape"), "embeddings.shape")
    need(isinstance(manifest["files"], dict), "files", "an object")
    for name, entry in manifest["files"].items():
        name_in_bundle(name, f"files[{name!r}]")
        need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)
             and not isinstance(entry.get("bytes"), bool), f"files[{name!r}]", "a {sha256, bytes} object")  # fmt: skip


def check_files(path: Path, manifest: dict[str, Any], verify: bool) -> None:
    files = manifest["files"]
    needed = [g["file"] for g in manifest["graphs"].values()]
    needed += [g["data_file"] for g in manifest["graphs"].values() if g.get("data_file")]
    needed += [manifest["embeddings"]["file"], CONFIG_FILE, TOKENIZER_FILE]
    unlisted = [name for name in needed if name not in files]
    if unlisted:
        raise ModelFileError(
            f"{path}/{MANIFEST_FILE} does not list {unlisted[0]}: the manifest is damaged; re-export the bundle"
        )
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise ModelFileError(f"bundle file {file} is missing; copy the whole bundle again or re-export it")
        if file.stat().st_size != entry["bytes"]:
            raise ModelFileError(
                f"bundle file {file} is {file.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                "it is truncated or from another bundle; copy the bundle again or re-export it"
            )
        if verify and sha256_file(file) != entry["sha256"]:
            raise ModelFileError(
                f"bundle file {file} was altered (sha256 differs from the manifest); copy the bundle again or re-export it"
            )


# Inputs a graph may have: the LLM's cached-positions count, since its attention keeps the cache in place.
OPTIONAL_IO = {LLM: {"past_length": (None,)}}


def expected_io(dims: ModelDims) -> dict[str, dict[str, tuple]]:
    """Static sizes each graph's inputs/outputs must have for this config (None = any)."""
    kv = (None, dims.num_kv_heads, None, dims.head_dim)
    llm_in = {"inputs_embeds": (None, None, dims.hidden_size), "position_ids": (None, None), "logits_index": (None,)}
    llm_out = {"logits": (None, None, dims.vocab_size)}
    for i in range(dims.num_layers):
        for kind in ("key", "value"):
            llm_in[kv_input_name(i, kind)] = kv
            llm_out[kv_output_name(i, kind)] = kv
    return {
        AUDIO_TOWER: {
            "mel": (None, dims.n_mels, WINDOW_FRAMES),
            "speech_tokens": (None, dims.tokens_per_window, dims.hidden_size),
        },
        LLM: {**llm_in, **llm_out},
    }


def check_against_config(path: Path, manifest: dict[str, Any], dims: ModelDims) -> None:
    """The graphs' declared I/O must fit config.json: catches graphs or a config from another model."""
    if manifest.get("model", {}).get("name", dims.name) != dims.name:
        raise ModelFileError(
            f"{path}: config.json is for model {dims.name!r}, the graphs for {manifest['model']['name']!r}; "
            "the bundle mixes two models: re-export it"
        )
    for graph, io in expected_io(dims).items():
        if graph not in manifest["graphs"]:
            raise ModelFileError(f"{path} has no {graph} graph; re-export the bundle with `fastslm-export`")
        g = manifest["graphs"][graph]
        declared = {t["name"]: tuple(t["shape"]) for t in g["inputs"] + g["outputs"]}
        for name, want in io.items():
            got = declared.get(name)
            ok = got is not None and len(got) == len(want) and all(w is None or w == d for w, d in zip(want, got))
            if not ok:
                raise ModelFileError(
                    f"{path}: {graph} {name} is shaped {list(got) if got else 'absent'}, config.json needs "
                    f"{['*' if w is None else w for w in want]}: the bundle mixes files from another model; re-export it"
                )
        for name, want in OPTIONAL_IO.get(graph, {}).items():  # newer bundles have them, older ones not
            if name in declared and len(declared[name]) != len(want):
                raise ModelFileError(
                    f"{path}: {graph} {name} is shaped {list(declared[name])}, expected {len(want)} dims; re-export it"
                )
        known = set(io) | set(OPTIONAL_IO.get(graph, {}))
        if not known >= set(declared):
            extra = sorted(set(declared) - known)
            raise ModelFileError(
                f"{path}: {graph} has unexpected inputs/outputs {extra[:3]}: it comes from another model; re-export it"
            )
    emb = manifest["embeddings"]
    if list(emb.get("shape", [])) != [dims.vocab_size, dims.hidden_size]:
        raise ModelFileError(
            f"{path}: the embedding table is shaped {emb.get('shape')}, config.json needs "
            f"{[dims.vocab_size, dims.hidden_size]}: it comes from another model; re-export the bundle"
        )
    check_embeddings_file(path / emb["file"], emb, dims)


def check_embeddings_file(file: Path, declared: dict[str, Any], dims: ModelDims) -> None:
    """The .npy itself (not only the manifest's word for it) must be the (vocab, hidden) table.

    A shorter table whose manifest entry was re-hashed would otherwise load and fail later with
    an IndexError on the first token id past its end. Only the header is read.
    """
    import numpy as np

    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy format version {version}")
            shape, _, dtype = read_header[version](f)
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise ModelFileError(f"{file} is not a readable .npy table ({' '.join(str(exc).split())[:200]}); re-export the bundle") from None
    want = (dims.vocab_size, dims.hidden_size)
    if tuple(shape) != want or str(dtype) != declared.get("dtype"):
        raise ModelFileError(
            f"{file} holds a {str(dtype)} table shaped {list(shape)}, config.json needs {declared.get('dtype')} "
            f"{list(want)}: the file comes from another model or was altered; re-export the bundle"
        )
