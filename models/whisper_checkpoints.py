"""Whisper encoder checkpoint readers: openai-whisper `.pt`, Hugging Face folders, CTranslate2 folders.

Each reader returns (dims, {our name: tensor}) with exactly `WhisperEncoder`'s module names, through
an explicit key map; every missing, unexpected or damaged entry is one ModelFileError line. Only
local files are read, and a `.pt` is loaded weights-only (no pickled code ever runs).
"""

from __future__ import annotations

import json
import math
import mmap
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..runtime.errors import ModelFileError
from .whisper_encoder import WhisperEncoder, WhisperEncoderDims


def read_whisper_encoder(path: Path) -> tuple[WhisperEncoderDims, dict[str, Tensor]]:
    """The encoder's dims and weights from whichever of the three layouts `path` is."""
    if not path.exists():
        raise ModelFileError(
            f"{path} does not exist: pass an openai-whisper .pt file or a Hugging Face / CTranslate2 Whisper folder"
        )
    if path.is_file() and path.name == "model.bin":
        path = path.parent
    if path.is_file():
        return _read_openai(path)
    if (path / "model.bin").is_file():
        return _read_ct2(path)
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return _read_hf(path)
    raise ModelFileError(
        f"{path} holds no model.safetensors, model.safetensors.index.json or model.bin: "
        "pass a Hugging Face Whisper folder saved as safetensors or a CTranslate2 Whisper folder"
    )




def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def _rename(tensors: dict[str, Tensor], key_map: dict[str, str], source: Path) -> dict[str, Tensor]:
    """{source name: tensor} -> {our name: tensor} via key_map (ours -> source); names both ways."""
    unexpected = sorted(set(tensors) - set(key_map.values()))
    if unexpected:
        raise ModelFileError(
            f"{source} has unexpected encoder weight {unexpected[0]!r}: it is not a standard Whisper encoder "
            "or its config does not match the weights"
        )
    for src in key_map.values():
        if src not in tensors:
            raise ModelFileError(f"{source} lacks {src!r}: the checkpoint is incomplete; download or convert it again")
    return {ours: tensors[src] for ours, src in key_map.items()}


def _our_names(dims: WhisperEncoderDims) -> list[str]:
    with torch.device("meta"):
        return list(WhisperEncoder(dims).state_dict())


def _read_openai(path: Path) -> tuple[WhisperEncoderDims, dict[str, Tensor]]:
    try:  # weights_only: a pickled object other than tensors and plain containers is refused, never run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        detail = found.group(1).split(". ")[0].strip() if found else _one_line(e)
        raise ModelFileError(
            f"{path} is not a tensors-only torch checkpoint ({detail}); fastslm never unpickles code: "
            "re-save it as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path} as a torch checkpoint ({_one_line(e)}): download it again") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("dims"), dict) and "model_state_dict" in ckpt):
        raise ModelFileError(
            f"{path} is not an openai-whisper checkpoint (no 'dims' and 'model_state_dict'): "
            "convert FastSLM checkpoints with fastslm-convert"
        )
    d = ckpt["dims"]
    try:
        dims = WhisperEncoderDims(
            n_mels=d["n_mels"], n_ctx=d["n_audio_ctx"], width=d["n_audio_state"],
            n_heads=d["n_audio_head"], n_layers=d["n_audio_layer"],
        )  # fmt: skip
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path} has unusable encoder dims ({_one_line(e)}): the checkpoint is damaged") from None
    enc = {k: v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}
    return dims, _rename(enc, {n: f"encoder.{n}" for n in _our_names(dims)}, path)


# Our module names -> Hugging Face WhisperEncoder's, outside and inside the blocks.
_HF_TOP = {"conv1": "conv1", "conv2": "conv2", "ln_post": "layer_norm"}
_HF_BLOCK = {
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}  # fmt: skip


def _hf_name(ours: str) -> str:
    if ours == "positional_embedding":
        return "embed_positions.weight"
    if ours.startswith("blocks."):
        _, i, rest = ours.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"layers.{i}.{_HF_BLOCK[module]}.{param}"
    module, param = ours.rsplit(".", 1)
    return f"{_HF_TOP[module]}.{param}"


def _read_hf(folder: Path) -> tuple[WhisperEncoderDims, dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type", "whisper") != "whisper":
            raise ValueError(f"model_type is {cfg.get('model_type')!r}, not 'whisper'")
        dims = WhisperEncoderDims(
            n_mels=cfg["num_mel_bins"], n_ctx=cfg["max_source_positions"], width=cfg["d_model"],
            n_heads=cfg["encoder_attention_heads"], n_layers=cfg["encoder_layers"],
        )  # fmt: skip
        if cfg.get("encoder_ffn_dim", 4 * dims.width) != 4 * dims.width or cfg.get("activation_function") != "gelu":
            raise ValueError("only Whisper's GELU MLP of 4 x d_model is supported")
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"{folder}/config.json is not a usable Whisper config ({_one_line(e)})") from None

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        tensors: dict[str, Tensor] = {}
        for name in files:
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(("model.encoder.", "encoder.")):
                        tensors[key] = f.get_tensor(key)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelFileError(f"cannot read the safetensors weights in {folder} ({_one_line(e)})") from None
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in tensors) else "encoder."
    enc = {k: t for k, t in tensors.items() if k.startswith(prefix)}
    return dims, _rename(enc, {n: prefix + _hf_name(n) for n in _our_names(dims)}, folder)


# CTranslate2 ---------------------------------------------------------------------------------

CT2_BINARY_VERSION = 6
# Type ids of ctranslate2's DataType enum (include/ctranslate2/types.h): 5 = bfloat16 (returned as float32).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}


def read_ct2_model_bin(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 `model.bin` (binary version 6) into (spec name, {name: array}).

    Layout, little-endian: uint32 version, string spec name, uint32 spec revision, uint32 count,
    then per variable: string name, uint8 rank, uint32 dims[rank], uint8 type id, uint32 byte
    count, raw data; then uint32 alias count and (alias, target) string pairs. A string is a
    uint16 length (counting its NUL) and the NUL-terminated bytes. Arrays are read-only views
    of the memory-mapped file; aliases map to their target's array; bfloat16 becomes float32.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path} ({_one_line(e)})") from None
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        pos += n
        return bytes(buf[pos - n : pos]).rstrip(b"\0").decode("utf-8")

    try:
        version = take("I")
        if version != CT2_BINARY_VERSION:
            raise ModelFileError(
                f"{path} is CTranslate2 binary version {version}, not {CT2_BINARY_VERSION}: "
                "convert the model again with ctranslate2 4.x"
            )
        spec, _revision = string(), take("I")
        arrays: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name, rank = string(), take("B")
            shape = [take("I") for _ in range(rank)]
            type_id, nbytes = take("B"), take("I")
            if type_id not in _CT2_DTYPES:
                raise ModelFileError(f"{path}: {name!r} has unknown type id {type_id}: the file is damaged")
            dtype = np.dtype(_CT2_DTYPES[type_id])
            if nbytes != math.prod(shape) * dtype.itemsize or pos + nbytes > len(buf):
                raise ModelFileError(f"{path}: {name!r} has a wrong byte count: the file is truncated or damaged")
            array = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=pos).reshape(shape)
            if type_id == 5:  # bfloat16: the high half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = array
            pos += nbytes
        if pos < len(buf):
            for _ in range(take("I")):
                alias, target = string(), string()
                arrays[alias] = arrays[target]
    except (struct.error, UnicodeDecodeError, KeyError) as e:
        raise ModelFileError(f"{path} is not a readable CTranslate2 model.bin ({_one_line(e)})") from None
    return spec, arrays


# Our names -> CTranslate2 names; query/key/value are cut from the fused self_attention/linear_0.
_CT2_TOP = {"conv1": "conv1", "conv2": "conv2", "ln_post": "layer_norm"}
_CT2_BLOCK = {
    "attn.out": "self_attention/linear_1", "attn_ln": "self_attention/layer_norm",
    "mlp.0": "ffn/linear_0", "mlp.2": "ffn/linear_1", "mlp_ln": "ffn/layer_norm",
}  # fmt: skip
_CT2_PARAM = {"weight": "weight", "bias": "bias"}
_CT2_LN_PARAM = {"weight": "gamma", "bias": "beta"}


def _ct2_name(ours: str) -> str:
    if ours == "positional_embedding":
        return "encoder/position_encodings/encodings"
    if ours.startswith("blocks."):
        _, i, rest = ours.split(".", 2)
        module, param = rest.rsplit(".", 1)
        if module in ("attn.query", "attn.key", "attn.value"):
            return f"encoder/layer_{i}/self_attention/linear_0/{param} ({module[5:]} rows)"
        params = _CT2_LN_PARAM if module.endswith("_ln") else _CT2_PARAM
        return f"encoder/layer_{i}/{_CT2_BLOCK[module]}/{params[param]}"
    module, param = ours.rsplit(".", 1)
    params = _CT2_LN_PARAM if module == "ln_post" else _CT2_PARAM
    return f"encoder/{_CT2_TOP[module]}/{params[param]}"


def _read_ct2(folder: Path) -> tuple[WhisperEncoderDims, dict[str, Tensor]]:
    spec, arrays = read_ct2_model_bin(folder / "model.bin")
    if spec != "WhisperSpec":
        raise ModelFileError(f"{folder}/model.bin holds a {spec}, not a WhisperSpec: pass a CTranslate2 Whisper model")
    enc = {k: v for k, v in arrays.items() if k.startswith("encoder/")}
    if any(k.endswith("weight_scale") for k in enc) or any(v.dtype.kind in "iu" and v.ndim > 1 for v in enc.values()):
        raise ModelFileError(f"{folder} is quantized: convert it with --quantization float16 or float32")
    conv1 = enc.get("encoder/conv1/weight")
    pos = enc.get("encoder/position_encodings/encodings")
    if conv1 is None or pos is None:
        raise ModelFileError(f"{folder}/model.bin lacks the encoder's conv1 or position encodings: it is incomplete")
    n_layers = len({m.group(1) for k in enc if (m := re.match(r"encoder/layer_(\d+)/", k))})
    heads = enc.pop("encoder/num_heads", None)  # an int16 scalar; Whisper's 64 per head if absent
    width = int(conv1.shape[0])
    try:
        dims = WhisperEncoderDims(
            n_mels=int(conv1.shape[1]), n_ctx=int(pos.shape[0]), width=width,
            n_heads=int(heads) if heads is not None else width // 64, n_layers=n_layers,
        )  # fmt: skip
    except ValueError as e:
        raise ModelFileError(f"{folder}/model.bin has inconsistent encoder sizes ({_one_line(e)})") from None

    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in enc.items()}
    for i in range(n_layers):  # split the fused [3D, D] projection into query, key, value
        base = f"encoder/layer_{i}/self_attention/linear_0"
        w, b = tensors.pop(f"{base}/weight", None), tensors.pop(f"{base}/bias", None)
        if w is None or b is None or w.shape != (3 * width, width) or b.shape != (3 * width,):
            raise ModelFileError(
                f"{folder}/model.bin: {base} is missing or not shaped [{3 * width}, {width}]: the file is damaged"
            )
        if bool((b[width : 2 * width] != 0).any()):
            raise ModelFileError(f"{folder}/model.bin: {base} has a key bias, which Whisper's encoder does not have")
        for j, part in enumerate(("query", "key", "value")):
            tensors[f"{base}/weight ({part} rows)"] = w[j * width : (j + 1) * width]
            if part != "key":
                tensors[f"{base}/bias ({part} rows)"] = b[j * width : (j + 1) * width]
    return dims, _rename(tensors, {n: _ct2_name(n) for n in _our_names(dims)}, folder / "model.bin")
