"""Checked weight assignment shared by every loader.

A loader turns a checkpoint into `{name: tensor}` under the module's own names and calls
`assign_checked`, which compares the names and shapes with what the module expects and
raises `ModelFileError` with one line naming the first offending key. Loading uses
`load_state_dict(assign=True)`, so a module built on the meta device gets the loaded
tensors themselves (no second copy of an 8 GB model in memory).

`read_safetensors_folder` reads a Hugging Face folder's model.safetensors or its shards
(model.safetensors.index.json) one tensor at a time; `SafetensorsFolder` reads a fastslm model
folder's on demand, under today's key names (`current_key` maps those of older folders).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.errors import ModelFileError


# Model folders written before the audio tower's parts had one name each stored the audio tower
# as `encoder.*` and the HFQ-Former as `adapter`; the published checkpoint's own layout is mapped
# by models/checkpoint.py, not here.
LEGACY_KEY_PREFIXES = (
    ("encoder.whisper.", "audio_tower.whisper."),
    ("encoder.adapter.", "audio_tower.hfq_former."),
)


def current_key(name: str) -> str:
    """A model folder's weight name in today's layout (older folders' names migrated)."""
    for old, new in LEGACY_KEY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _first_and_more(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def check_names_and_shapes(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    source: str = "weights",
) -> None:
    """Raise ModelFileError unless `tensors` holds exactly the module's state (names and shapes).

    `ignore` holds fnmatch patterns of names that are neither required nor loaded: checkpoint
    extras (a tied `lm_head.weight`, rotary `*.inv_freq` buffers) and state the module
    derives itself (sinusoid buffers).
    """
    ignore = tuple(ignore)
    expected = {
        name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items() if not _ignored(name, ignore)
    }
    given = {name: t for name, t in tensors.items() if not _ignored(name, ignore)}

    missing = sorted(name for name in expected if name not in given)
    if missing:
        raise ModelFileError(
            f"{source} lacks {_first_and_more(missing)}: the file is incomplete or for another model; "
            "download or convert it again"
        )
    unexpected = sorted(name for name in given if name not in expected)
    if unexpected:
        raise ModelFileError(
            f"{source} has unexpected key {_first_and_more(unexpected)}: the weights are for another model "
            "or the configuration does not match them"
        )
    for name, shape in expected.items():
        got = tuple(given[name].shape)
        if got != shape:
            raise ModelFileError(
                f"{source}: {name} has shape {list(got)} but the model expects {list(shape)}; "
                "the configuration does not match the weights"
            )


def assign_checked(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    source: str = "weights",
) -> None:
    """Check names and shapes (see `check_names_and_shapes`), then assign the tensors to `module`."""
    ignore = tuple(ignore)
    check_names_and_shapes(module, tensors, ignore=ignore, source=source)
    kept = {name: t for name, t in tensors.items() if not _ignored(name, ignore)}
    result = module.load_state_dict(kept, strict=False, assign=True)
    left = [name for name in result.missing_keys if not _ignored(name, ignore)] + list(result.unexpected_keys)
    if left:  # the check above makes this a bug, not a user error
        raise RuntimeError(f"load_state_dict disagrees with the name check: {left[:3]}")


# ---------------------------------------------------------------------------------------------
# Hugging Face folder reading (config.json, model.safetensors or shards)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; the model folder needs the Hugging Face config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}; download it again") from None


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json (all checked to exist)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise ModelFileError(f"{folder} has neither model.safetensors nor model.safetensors.index.json; download the weights")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{index} has no weight_map; download it again")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise ModelFileError(f"shard {path.name} listed in {index.name} is missing from {folder}; download it again")
    return files


def read_safetensors_folder(folder: Path, dtype: torch.dtype, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), one at a time, cast to dtype (floating ones)."""
    from safetensors import SafetensorError, safe_open

    skip = tuple(skip)
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if _ignored(key, skip):
                        continue
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if t.is_floating_point() else t
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"cannot read {path}: {exc}; the file is corrupt or truncated, download it again") from None
    return tensors


class SafetensorsFolder:
    """The tensors of a folder's model.safetensors or shards, read one at a time on demand.

    Nothing is read until asked for, so a 9 GB model can be exported, quantized or checked tensor
    by tensor with memory for one tensor. Names are today's (`current_key`), whatever layout the
    folder was written in.
    """

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, str] = {}  # today's name -> the name in the file
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in safetensors_files(self.folder):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for stored in handle.keys():
                        key = current_key(stored)
                        if key in self._stored:
                            raise ModelFileError(f"{self.folder} holds {key} twice ({self._stored[key]}, {stored}); "
                                                 "re-create the model folder")
                        self._file_of[key], self._stored[key] = path, stored
                        self._shapes[key] = tuple(handle.get_slice(stored).get_shape())
            except (SafetensorError, OSError) as exc:
                raise ModelFileError(f"{path} is damaged ({exc}); re-create the model folder") from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if name not in self._file_of:
            raise ModelFileError(f"{self.folder} lacks {name}: the weights are incomplete or for another model")
        try:
            # Opened per tensor: safetensors memory-maps the whole file, and pages read through a map
            # that stays open count in the process's RSS (5 GB of them midway through a 4 B model).
            with safe_open(str(self._file_of[name]), framework="pt") as handle:
                t = handle.get_tensor(self._stored[name])
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"cannot read {name} from {self._file_of[name]}: {exc}; re-create the model folder") from None
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._file_of.values()))
