"""Uploaded bytes -> 16 kHz mono samples, within the server's bounds.

The duration comes from the file header before anything is decoded, so a long recording is
refused without spending its decoding time and memory. Mono mixing and resampling are
`runtime.audio.load_audio`'s, as for files on disk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE, load_audio
from ..errors import AudioError
from .api_errors import ApiError, bad_request, too_large

# What `input_audio.format` may say; libsndfile reads each (and finds the real format itself).
CHAT_AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")


@dataclass(frozen=True)
class Upload:
    samples: np.ndarray  # float32 mono at 16 kHz
    seconds: float
    sha256: str  # of the uploaded bytes: the audio-prefix cache's key


def read_upload(data: bytes, *, max_bytes: int, max_seconds: float, param: str = "file") -> Upload:
    if len(data) > max_bytes:
        raise too_large(f"the audio is {len(data) / 2**20:.1f} MiB, over this server's {max_bytes / 2**20:.1f} MiB "
                        "limit: send a shorter or compressed recording", param=param)  # fmt: skip
    if not data:
        raise bad_request("the audio is empty: send the bytes of a recording", code="invalid_audio", param=param)
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise not_audio(exc, param) from None
    if info.samplerate > 0 and info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise audio_too_long(info.frames / info.samplerate, max_seconds, param)
    try:
        raw, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        samples = load_audio(raw, rate)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise not_audio(exc, param) from None
    except AudioError as exc:
        raise bad_request(str(exc), code="invalid_audio", param=param) from None
    seconds = len(samples) / SAMPLE_RATE
    if seconds > max_seconds:  # a header may under-state the length (e.g. streamed mp3)
        raise audio_too_long(seconds, max_seconds, param)
    return Upload(samples, seconds, hashlib.sha256(data).hexdigest())


def decode_base64_audio(data: object, *, max_bytes: int, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad_request(f"{param} must be the recording as a base64 string", param=param)
    if len(data) > max_bytes * 4 // 3 + 4:
        raise too_large(f"the audio is over this server's {max_bytes / 2**20:.1f} MiB limit: send a shorter recording",
                        param=param)  # fmt: skip
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64: encode the file's bytes with base64", param=param) from None


def not_audio(exc: Exception, param: str) -> ApiError:
    # libsndfile names the file it opened: here an in-memory object nobody needs to see
    reason = re.sub(r"^Error opening <[^>]*>: ", "", " ".join(str(exc).split())) or type(exc).__name__
    return bad_request(f"the upload is not audio this server can read ({reason}): send wav, flac, mp3 or ogg",
                       code="invalid_audio", param=param)  # fmt: skip


def audio_too_long(seconds: float, max_seconds: float, param: str) -> ApiError:
    return bad_request(f"the audio is {seconds:.0f} s long, over this server's {max_seconds:.0f} s limit: "
                       "split the recording", code="audio_too_long", param=param)  # fmt: skip
