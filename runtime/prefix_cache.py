"""Saving an AudioSession next to its recording, so reopening it answers without the audio tower.

One `.npz` file (numpy's zip of raw arrays, read with allow_pickle=False: no pickle, no code),
`RECORDING.fastslm-cache.npz`:
- `header`: UTF-8 JSON as uint8: format and version, the audio's content key (sha256 of its
  16 kHz float32 samples), the model's identity (`Pipeline.identity`: the bundle's file hashes or
  the model folder's), the speech-token shape, and each prefix's task, language and token ids;
- `speech`: the speech tokens (every task's prefix can be rebuilt from them by prefill alone);
- `p{i}_key_{layer}`, `p{i}_value_{layer}`: prefix i's KV cache.
A file for other audio, another model, another format version, or with damaged arrays is refused
with one line (CacheFileError); it is never silently replaced.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .errors import CacheFileError, OptionError
from .kv_cache import KVCache
from .output_folder import written_whole
from .prompt import Task

if TYPE_CHECKING:
    from .generate import Pipeline
    from .session import AudioSession

FORMAT = "fastslm-audio-prefix"
FORMAT_VERSION = 1
SUFFIX = ".fastslm-cache.npz"


def cache_path_for(recording: str | Path) -> Path:
    """Where the cache of a recording lives: next to it, `meeting.wav` -> `meeting.wav.fastslm-cache.npz`."""
    recording = Path(recording)
    return recording.with_name(recording.name + SUFFIX)


def save_session(session: "AudioSession", path: Path) -> Path:
    pipe = session.pipe
    if session.audio_sha256 is None:
        raise OptionError("this session was opened from speech tokens, not audio, so it has no content key to save under")
    if pipe.identity is None:
        raise OptionError("this pipeline has no model identity (it was built by hand); open it with Pipeline.load to save caches")
    prefixes = list(session.prefixes.items())
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "audio_sha256": session.audio_sha256,
        "file_sha256": session.file_sha256,
        "model": pipe.identity,
        "audio_seconds": session.speech.seconds,
        "n_windows": session.speech.n_windows,
        "prefixes": [
            {"task": key[0].name, "language": key[1], "left_ids": session.prefix_ids(key)[0], "length": cache.length}
            for key, cache in prefixes
        ],
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), "speech": session.speech.embeddings}
    for i, (_, cache) in enumerate(prefixes):
        cache = cache.to_numpy()
        arrays.update({f"p{i}_key_{layer}": k for layer, k in enumerate(cache.keys)})
        arrays.update({f"p{i}_value_{layer}": v for layer, v in enumerate(cache.values)})
    # Written beside the target and renamed over it, so a crash never leaves half a cache.
    with written_whole(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_session(pipe: "Pipeline", path: Path, file_sha256: str | None, audio_sha256: Callable[[], str]) -> "AudioSession":
    """The saved session for this audio and this pipeline's model; CacheFileError (one line) otherwise.

    The audio matches when the recording file's bytes hash is the one saved (no decoding), or else
    when its decoded samples hash is (`audio_sha256` is called only then).
    """
    from .generate import SpeechTokens
    from .session import AudioSession

    fix = f"delete {path.name} to rebuild it from the recording"
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load would take any other bytes for a pickle
        raise CacheFileError(f"{path} is not a fastslm audio-prefix cache (not an .npz file, or cut short); {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise CacheFileError(f"{path} is not a fastslm audio-prefix cache; {fix}")
            if header.get("format_version") != FORMAT_VERSION:
                raise CacheFileError(
                    f"{path} is an audio-prefix cache of format version {header.get('format_version')}, this fastslm "
                    f"reads version {FORMAT_VERSION}; {fix}"
                )
            same_file = file_sha256 is not None and header.get("file_sha256") == file_sha256
            if not same_file and header.get("audio_sha256") != audio_sha256():
                raise CacheFileError(f"{path} was saved for other audio (the recording changed since); {fix}")
            if pipe.identity is None or header.get("model") != pipe.identity:
                raise CacheFileError(f"{path} was saved by another model or bundle than {pipe.model_name}; {fix}")
            speech = np.asarray(data["speech"], dtype=np.float32)
            template = pipe.backend.empty_cache().to_numpy()  # this model's layer count, KV shape and dtype
            prefixes = {}
            for i, entry in enumerate(header["prefixes"]):
                key = (Task[entry["task"]], entry["language"])
                n = template.num_layers
                cache = KVCache([data[f"p{i}_key_{layer}"] for layer in range(n)], [data[f"p{i}_value_{layer}"] for layer in range(n)])
                want = template.keys[0]
                for array in cache.keys + cache.values:
                    if array.dtype != want.dtype or array.shape[:2] + array.shape[3:] != want.shape[:2] + want.shape[3:]:
                        raise CacheFileError(f"{path} holds a KV cache shaped {list(array.shape)} {array.dtype}, not this model's; {fix}")
                prefixes[key] = (entry, cache)
    except CacheFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CacheFileError(f"cannot read audio-prefix cache {path} ({reason}); {fix}") from None

    n_windows, per_window = header["n_windows"], pipe.backend.tokens_per_window
    if speech.shape != (n_windows * per_window, pipe.backend.hidden_size):
        raise CacheFileError(f"{path} holds speech tokens shaped {list(speech.shape)}, not this model's; {fix}")
    session = AudioSession(pipe, SpeechTokens(speech, n_windows, float(header["audio_seconds"])), header["audio_sha256"],
                           file_sha256=file_sha256)
    for key, (entry, cache) in prefixes.items():
        left, _ = session.prefix_ids(key)
        # The tokenizer or prompt layout changed since: the KV positions would not mean the same text.
        if entry["left_ids"] != left or cache.length != len(left) + len(speech) + 1:
            raise CacheFileError(f"{path} holds a {key[0].name} prefix of other tokens than this fastslm builds; {fix}")
        session.prefixes[key] = cache
    session.loaded_prefixes = frozenset(session.prefixes)
    return session
