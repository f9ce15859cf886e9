"""Frozen-encoder features of the training windows, computed once and memory-mapped.

The Whisper encoder is frozen in the demo recipe, so its output for each window never changes:
the features stage runs it once per window and stores the (1500, width) outputs as float16 in
``.npy`` shards of ``shard_size`` windows:

    features/index.json        format, window count, shard size, shape, the windows file's hash
    features/shard_00000.npy   (shard_size, 1500, width) float16, the last shard shorter

A shard is written to ``shard_XXXXX.npy.tmp`` and renamed when complete, so a killed run
leaves only whole shards and a rerun skips them; an index written for another windows file
is refused rather than mixed with it.

With ``--tune-encoder-blocks N`` the last N blocks (and ln_post) train with the rest, so a shard
holds what goes into them: the residual stream after the first ``n_layers - N`` frozen blocks
(``"tuned_top_blocks": N`` in the index). Training runs the top on it; storing it costs the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...runtime.audio import audio_to_windows
from .windows import RecipeError, Utterance, window_audio

FORMAT = "fastslm-demo-features"
INDEX_FILE = "index.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


@dataclass
class FeatureStats:
    computed: int = 0  # windows encoded by this run
    skipped: int = 0  # windows in shards that were already done
    seconds: float = 0.0  # wall time spent on the computed windows (audio + mel + encoder)

    @property
    def seconds_per_window(self) -> float:
        return self.seconds / self.computed if self.computed else float("nan")


def check_tuned_top_blocks(tuned_top_blocks: int, n_layers: int) -> None:
    if not 0 <= tuned_top_blocks <= n_layers:
        raise RecipeError(f"--tune-encoder-blocks must be 0 to {n_layers} (the encoder's blocks); got {tuned_top_blocks}")


def stored_features(encoder: torch.nn.Module, mel: torch.Tensor, tuned_top_blocks: int) -> torch.Tensor:
    """What a window's row holds: the encoder's output, or the input of its last `tuned_top_blocks` blocks."""
    return encoder.hidden(mel, encoder.dims.n_layers - tuned_top_blocks) if tuned_top_blocks else encoder(mel)


def encoder_output(encoder: torch.nn.Module, stored: torch.Tensor, tuned_top_blocks: int) -> torch.Tensor:
    """The encoder's output from a stored row (`stored_features`): `encoder`'s top run on it, if it holds the top's input."""
    return encoder.head(stored, encoder.dims.n_layers - tuned_top_blocks) if tuned_top_blocks else stored


def _encode_batch(encoder: torch.nn.Module, mel: np.ndarray, tuned_top_blocks: int) -> np.ndarray:
    with torch.inference_mode():
        return stored_features(encoder, torch.from_numpy(mel), tuned_top_blocks).to(torch.float16).numpy()


def window_mel(spec: dict, utterances: dict[str, Utterance], n_mels: int) -> np.ndarray:
    """(n_mels, 3000) log-mel of one window, exactly as the runtime computes it for that audio."""
    mel = audio_to_windows(window_audio(spec, utterances), n_mels=n_mels)
    if mel.shape[0] != 1:
        raise RecipeError(f"window {spec['id']} spans {mel.shape[0]} Whisper windows, not one: rerun the windows stage")
    return mel[0]


def extract_features(
    windows: list[dict],
    utterances: dict[str, Utterance],
    encoder: torch.nn.Module,
    out_dir: Path,
    windows_sha256: str,
    *,
    shard_size: int = 64,
    batch_size: int = 2,
    progress: bool = True,
    tuned_top_blocks: int = 0,
) -> FeatureStats:
    """Encode every window not yet in a finished shard (see the module docstring)."""
    dims = encoder.dims
    check_tuned_top_blocks(tuned_top_blocks, dims.n_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {
        "format": FORMAT,
        "n_windows": len(windows),
        "shard_size": shard_size,
        "frames": dims.n_ctx,
        "width": dims.width,
        "dtype": "float16",
        "windows_sha256": windows_sha256,
        "encoder": dims.to_dict(),
        # only when set, so the folders of runs made before the option keep their index
        **({"tuned_top_blocks": tuned_top_blocks} if tuned_top_blocks else {}),
    }
    index_path = out_dir / INDEX_FILE
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        keep = {k: v for k, v in old.items() if k != "seconds_per_window"}
        if keep != index:
            raise RecipeError(f"{out_dir} holds features of other windows or another encoder; "
                              "delete that folder to recompute them")
    else:
        index_path.write_text(json.dumps(index, indent=1) + "\n")

    encoder = encoder.eval()
    stats = FeatureStats()
    n_shards = -(-len(windows) // shard_size)
    bar = tqdm(total=len(windows), desc="features", unit="window", disable=not progress, smoothing=0.05)
    for k in range(n_shards):
        part = windows[k * shard_size : (k + 1) * shard_size]
        final = out_dir / shard_name(k)
        if final.is_file():
            stats.skipped += len(part)
            bar.update(len(part))
            continue
        tmp = out_dir / (shard_name(k) + ".tmp")
        shard = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(part), dims.n_ctx, dims.width))
        for start in range(0, len(part), batch_size):
            t0 = time.perf_counter()
            specs = part[start : start + batch_size]
            mel = np.stack([window_mel(s, utterances, dims.n_mels) for s in specs])  # (B, n_mels, 3000)
            shard[start : start + len(specs)] = _encode_batch(encoder, mel, tuned_top_blocks)
            stats.seconds += time.perf_counter() - t0
            stats.computed += len(specs)
            bar.update(len(specs))
            bar.set_postfix(s_per_window=f"{stats.seconds_per_window:.2f}")
        shard.flush()
        del shard
        os.replace(tmp, final)
    bar.close()
    if stats.computed:
        index["seconds_per_window"] = round(stats.seconds_per_window, 4)
        index_path.write_text(json.dumps(index, indent=1) + "\n")
    return stats


class FeatureStore:
    """Read-only access to the features of window i: (frames, width) float16, memory-mapped."""

    def __init__(self, folder: Path):
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise RecipeError(f"{folder} has no {INDEX_FILE}: run the features stage first")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise RecipeError(f"{index_path} is not a features index: delete {folder} and rerun the features stage")
        self.shard_size = self.index["shard_size"]
        n_shards = -(-self.index["n_windows"] // self.shard_size)
        missing = [shard_name(k) for k in range(n_shards) if not (folder / shard_name(k)).is_file()]
        if missing:
            raise RecipeError(f"{folder} lacks {len(missing)} shard(s) ({missing[0]} ...): "
                              "the features stage did not finish; rerun it (it resumes)")
        self.shards = [np.load(folder / shard_name(k), mmap_mode="r") for k in range(n_shards)]

    def __len__(self) -> int:
        return self.index["n_windows"]

    @property
    def width(self) -> int:
        return self.index["width"]

    @property
    def tuned_top_blocks(self) -> int:
        """0: the encoder's output; N: the input of its last N blocks (see the module docstring)."""
        return self.index.get("tuned_top_blocks", 0)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.shards[i // self.shard_size][i % self.shard_size]

    def batch(self, indices: list[int]) -> np.ndarray:
        return np.stack([self[i] for i in indices])  # (B, frames, width) float16


class EncoderOutputs:
    """The encoder's output of each stored window, whichever the store holds: its rows as they are,
    or, for features of tuned top blocks, the pretrained top run on them (what tiny.en's own
    alignment reads, alignment.py)."""

    def __init__(self, store: FeatureStore, encoder: torch.nn.Module | None):
        if store.tuned_top_blocks and encoder is None:
            raise ValueError(f"the feature store holds the input of the last {store.tuned_top_blocks} blocks: "
                             "EncoderOutputs needs the pretrained encoder to finish them")
        self.store, self.encoder = store, encoder.eval() if encoder is not None else None

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> np.ndarray:
        row = self.store[i]
        if not self.store.tuned_top_blocks:
            return row
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(row, dtype=np.float32))[None]
            return encoder_output(self.encoder, x, self.store.tuned_top_blocks)[0].numpy()  # (frames, width) float32
