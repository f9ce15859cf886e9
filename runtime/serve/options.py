"""What the server accepts and how much of it: one frozen dataclass, checked once at start."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from ..errors import OptionError

# OpenAI's own upload limit for /v1/audio/transcriptions, so clients built for it fit.
DEFAULT_MAX_AUDIO_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # loopback: only this machine's apps can reach it
    port: int = 8000
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer KEY`
    max_audio_bytes: int = DEFAULT_MAX_AUDIO_BYTES  # one recording as uploaded (before base64)
    max_audio_seconds: float = 1800.0  # and as decoded; the model's context may refuse less
    queue_size: int = 32  # requests waiting for a worker; one more is answered 429
    workers: int = 1  # generations at once; on a CPU one already uses every core
    # Encoded recordings (speech tokens and audio-prefix KV caches) kept for the next question, in MiB:
    # an 11 s clip costs about 0.8 MB on the demo model, a 25-minute one hundreds of MB on a 4B model.
    prefix_cache_mb: float = 1024.0
    max_new_tokens: int = 512  # default and ceiling of a request's max_tokens

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise OptionError(f"port {self.port!r} is invalid: use 1-65535")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("the API key is empty: pass a non-empty --api-key or leave it out")
        for name in ("max_audio_bytes", "queue_size", "workers", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name.replace('_', '-')} {value!r} is invalid: use a whole number >= 1")
        mb = self.prefix_cache_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb < 0:
            raise OptionError(f"prefix-cache-mb {mb!r} is invalid: use a number of MiB >= 0 (0 keeps nothing)")
        seconds = self.max_audio_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise OptionError(f"max-audio-seconds {seconds!r} is invalid: use a positive number")

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        """The largest HTTP body: a recording base64-encoded inside JSON (4/3) plus room for the text."""
        return self.max_audio_bytes * 4 // 3 + 1024 * 1024

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost may resolve anywhere
            return False
