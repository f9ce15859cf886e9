"""A recording still being made: encode and prefill each 30 s window as soon as it is complete.

    live = pipe.open_stream(prepare=["What was decided?"])
    for chunk in microphone():          # PCM chunks of any size
        live.feed(chunk)
    session = live.finish()             # only the last partial window is left to do here
    print(session.ask("What was decided?").text)

The result is the AudioSession `Pipeline.open` makes from the whole recording: the same windows
(mel_stream), the same speech tokens, the same prefix chunks, so the same answer tokens.

Two things tie earlier windows to later audio, and both are handled here:
- The task token precedes the audio in FastSLM's prompt, so the prefix depends on the task. The
  tasks to expect are given up front (`prepare`); any other task is prefilled from the kept
  speech tokens when first asked (no audio tower).
- Whisper's clamp floors the log-mel at 8 decades below the loudest value of the whole recording.
  Each window is encoded with the peak known so far; when a louder window arrives, the earlier
  windows whose mel that changes are encoded again and the prefixes rebuilt, as audio arrives.
  The work left at `finish` is the last window, plus such a repair only if the last window is the
  loudest of the recording (`reencoded_windows` counts them).

A recording that is already whole (a file, an array) is opened the same way (`open_recording`),
read twice as a bounded stream of blocks (runtime.audio_stream): once for its loudest mel value,
once to encode each window with it. No repair is needed then, and nothing but the speech tokens
grows with the recording's length, so an hour-long file costs its speech tokens, not its samples.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import MAX_RATE, MIN_RATE, SAMPLE_RATE, load_audio, window_count
from .audio_stream import AudioReader
from .errors import AudioError, OptionError
from .mel_stream import MelWindowStream, RawWindow
from .prompt import AUDIO_EOS, Task
from .sampling import SamplingOptions
from .session import AudioSession, PrefixBuilder, PrefixKey, prefix_ids, prefix_key

if TYPE_CHECKING:
    from .generate import Pipeline

# Raw PCM sample formats `fastslm-run -` reads (ffmpeg's names; little-endian, interleaved channels):
# bytes per sample, and the numpy dtype (s24le has none: it is unpacked into int32).
PCM_FORMATS = {"u8": 1, "s16le": 2, "s24le": 3, "s32le": 4, "f32le": 4, "f64le": 8}
_PCM_DTYPES = {"u8": "u1", "s16le": "<i2", "s32le": "<i4", "f32le": "<f4", "f64le": "<f8"}


def pcm_from_bytes(data: bytes, fmt: str, channels: int) -> np.ndarray:
    """Raw interleaved PCM bytes -> (samples, channels) array (whole frames only), scaled by load_audio later."""
    if fmt not in PCM_FORMATS:
        raise OptionError(f"unknown input format {fmt!r}: use one of {', '.join(PCM_FORMATS)}")
    frame = PCM_FORMATS[fmt] * channels
    if len(data) % frame:
        raise OptionError(f"the raw audio ends in the middle of a {frame}-byte sample frame: check --input-format and channels")
    if fmt == "s24le":  # each sample's 3 bytes into the top of an int32: exact, and scaled as 32-bit PCM
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
        return ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).view(np.int32).reshape(-1, channels)
    return np.frombuffer(data, dtype=_PCM_DTYPES[fmt]).reshape(-1, channels)


class StreamingSession:
    """Feed PCM chunks as they arrive; `finish` returns the AudioSession of the whole recording."""

    def __init__(
        self,
        pipe: "Pipeline",
        *,
        prepare: Sequence[Task | str | None] = (Task.SQQA,),
        language: str | None = None,
        sample_rate: int = SAMPLE_RATE,
        reserve_tokens: int = SamplingOptions().max_new_tokens + 64,
        peak: float | None = None,
        progress: "Callable[[int, int], None] | None" = None,
        expected_windows: int = 0,
    ):
        """`peak`: the recording's loudest raw log-mel value when known up front (`open_recording`):
        windows are then encoded once, in the backend's batches, and not kept for a repair.
        `progress(windows done, expected_windows)` is called after each encoding."""
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not MIN_RATE <= sample_rate <= MAX_RATE:
            # A rate of 1 Hz would make every input byte 16000 samples: hours of "audio" from a few bytes.
            raise OptionError(
                f"sample rate {sample_rate!r} is invalid: give the input's rate in Hz, {MIN_RATE}..{MAX_RATE} (e.g. 16000)"
            )
        self.pipe = pipe
        self.sample_rate = sample_rate
        self._keys: list[PrefixKey] = []
        for item in prepare:
            key = (item, prefix_key(None, language)[1]) if isinstance(item, Task) else prefix_key(item, language)
            if key not in self._keys:
                self._keys.append(key)
        self._reserve = reserve_tokens
        self._mel = MelWindowStream(pipe.backend.n_mels)
        self._raw: list[RawWindow] = []  # kept so a louder later window can re-clamp them (peak unknown)
        self._pending: list[RawWindow] = []  # peak known: windows waiting for a full audio-tower batch
        self._tokens: list[np.ndarray] = []  # speech tokens per window
        self._known_peak = peak is not None
        self._peak = -np.inf if peak is None else float(peak)
        self._progress = progress
        self._expected_windows = expected_windows
        self._left = {key: prefix_ids(pipe, *key)[0] for key in self._keys}
        self._builders = {key: PrefixBuilder(pipe, left) for key, left in self._left.items()}
        self._beyond_context = False
        self._finished = False
        self._hash = hashlib.sha256()
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ")
        self.reencoded_windows = 0
        self.audio_tower_s = 0.0
        self.prefill_s = 0.0

    @property
    def seconds(self) -> float:
        return self._mel.samples_seen / SAMPLE_RATE

    def feed(self, samples: np.ndarray) -> int:
        """Add PCM samples (1-D, or (samples, channels); float, or int16/int32 PCM) at the session's rate.

        Encodes and prefills every window this completes; returns how many windows are done so far.
        """
        if self._finished:
            raise OptionError("this stream is finished: open a new one with pipe.open_stream() for another recording")
        samples = np.asarray(samples)
        if samples.size == 0:
            return len(self._tokens)
        frames = len(samples)
        if samples.ndim == 2 and samples.shape[0] <= samples.shape[1]:
            # A chunk of fewer frames than channels (a pipe can hand over one stereo frame): load_audio takes
            # the shorter side for the channels, so pad it with silent frames and keep the real ones.
            silence = np.zeros((samples.shape[1] + 1 - frames, samples.shape[1]), samples.dtype)
            samples = np.concatenate([samples, silence])
        mono = load_audio(samples, SAMPLE_RATE)[:frames]  # scaling and channel mixing as for a whole recording
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono.astype(np.float64)).astype(np.float32)
        self._add(mono)
        return len(self._tokens)

    def finish(self) -> AudioSession:
        """The recording has ended: do what is left and return the session to ask."""
        if self._finished:
            raise OptionError("this stream is already finished: keep the session its finish() returned")
        self._finished = True
        t0 = time.perf_counter()
        audio_tower, prefill = self.audio_tower_s, self.prefill_s
        if self._resampler is not None:
            self._add(self._resampler.resample_chunk(np.zeros(0), last=True).astype(np.float32))
        if self._mel.samples_seen == 0:
            raise AudioError("the audio stream has no samples: pass a non-empty recording")
        seconds = self.seconds
        self._take(self._mel.finish())
        self._encode_pending()
        from .generate import SpeechTokens

        t1 = time.perf_counter()
        eos = self.pipe.tokenizer.token_id(AUDIO_EOS)
        prefixes = {key: builder.close(eos) for key, builder in self._builders.items()}
        self.prefill_s += time.perf_counter() - t1
        speech = SpeechTokens(np.concatenate(self._tokens), len(self._tokens), seconds)
        opening = {"audio_tower_s": self.audio_tower_s - audio_tower, "prefill_s": self.prefill_s - prefill}
        return AudioSession(self.pipe, speech, self._hash.hexdigest(), prefixes=prefixes, opened_at=t0, opening=opening)

    # ---- internals -------------------------------------------------------------------------

    def _add(self, mono: np.ndarray) -> None:
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        self._hash.update(mono.tobytes())
        self._take(self._mel.feed(mono))

    def _take(self, windows: list[RawWindow]) -> None:
        for window in windows:
            if self._known_peak:
                if window.peak > self._peak:
                    raise AudioError("the recording changed while it was being read (it got louder): open it again once it is written")
                self._pending.append(window)
                if len(self._pending) >= max(1, self.pipe.backend.max_windows_per_batch):
                    self._encode_pending()
                continue
            new_peak = max(self._peak, window.peak)
            changed = [w.index for w in self._raw if w.changed_by(self._peak, new_peak)]
            self._peak = new_peak
            self._raw.append(window)
            if changed:  # a louder window moved the clamp: what the one-shot mel would hold has changed
                self.reencoded_windows += len(changed)
                for index, tokens in zip(changed, self._encode([self._raw[i] for i in changed])):
                    self._tokens[index] = tokens
                self._rebuild_prefixes()
            (tokens,) = self._encode([window])
            self._tokens.append(tokens)
            self._extend_prefixes(tokens)
            self._report()

    def _encode_pending(self) -> None:
        """Encode the windows held for a batch (the batches `Pipeline.encode_samples` makes, so the same tokens)."""
        if not self._pending:
            return
        for tokens in self._encode(self._pending):
            self._tokens.append(tokens)
            self._extend_prefixes(tokens)
        self._pending = []
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            done = len(self._tokens)
            self._progress(done, max(done, self._expected_windows))

    def _encode(self, windows: list[RawWindow]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        mel = np.stack([w.clamped(self._peak) for w in windows])
        out = self.pipe.backend.encode_windows(mel)  # (W, tokens_per_window, hidden)
        self.audio_tower_s += time.perf_counter() - t0
        return list(out)

    def _extend_prefixes(self, tokens: np.ndarray) -> None:
        if self._beyond_context:
            return
        per_window = self.pipe.backend.tokens_per_window
        longest_left = max(map(len, self._left.values()), default=0)
        if longest_left + len(self._tokens) * per_window + 1 + self._reserve > self.pipe.backend.max_context:
            # Past one context the session answers in parts (beyond_context); it builds their prefixes then.
            self._beyond_context, self._builders = True, {}
            return
        t0 = time.perf_counter()
        for builder in self._builders.values():
            builder.add(tokens)
        self.prefill_s += time.perf_counter() - t0

    def _rebuild_prefixes(self) -> None:
        if self._beyond_context:
            return
        t0 = time.perf_counter()
        self._builders = {key: PrefixBuilder(self.pipe, left) for key, left in self._left.items()}
        for tokens in self._tokens:
            for builder in self._builders.values():
                builder.add(tokens)
        self.prefill_s += time.perf_counter() - t0


def open_recording(
    pipe: "Pipeline",
    audio: "str | Path | np.ndarray",
    sample_rate: int | None = None,
    progress: "Callable[[int, int], None] | None" = None,
    file_sha256: str | None = None,
    opened_at: float | None = None,
) -> AudioSession:
    """`Pipeline.open`'s work for a whole recording: read it twice in bounded blocks, never whole.

    The first pass finds the loudest raw log-mel value (Whisper's clamp needs the whole
    recording's); the second encodes each window clamped by it, as `audio_to_windows` would, in
    the backend's batches, hashing the samples for the content key on the way.
    """
    t0 = time.perf_counter()
    opened_at = t0 if opened_at is None else opened_at
    reader = AudioReader(audio, sample_rate)
    mel = MelWindowStream(pipe.backend.n_mels)
    peak = -np.inf
    for block in reader.blocks():
        peak = max([peak, *(w.peak for w in mel.feed(block))])
    peak = max([peak, *(w.peak for w in mel.finish())])
    live = StreamingSession(pipe, prepare=(), peak=peak, progress=progress,
                            expected_windows=window_count(int(round(reader.seconds * SAMPLE_RATE))))
    for block in reader.blocks():
        live._add(block)  # already 16 kHz float32 mono, checked by the reader
    session = live.finish()
    session.file_sha256, session._opened_at = file_sha256, opened_at
    session._opening = {"audio_tower_s": time.perf_counter() - t0}  # reading, log-mel and the audio tower
    return session

