"""Log-mel windows computed while the samples are still arriving, bit-identical to `audio_to_windows`.

Whisper's STFT frame t is centred on sample 160 t and reaches 200 samples to either side, so the
3000 frames of window k are known once sample 480000 (k + 1) + 40 has arrived; only the frames
of the last window need the end of the recording (its reflect padding). The chunks are the ones
`log_mel_spectrogram` computes, so each window's log10 mel is the same float64 array either way.

What cannot be known early is the clamp: Whisper floors every value at 8 decades below the
loudest value of the *whole* recording. Windows therefore come out raw (`RawWindow`: log10 mel
before the clamp, with its peak and minimum), and the caller clamps them with the peak known so
far and re-clamps the ones a louder later window changes (`changed_by`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import HOP_LENGTH, MIN_SAMPLES, N_FFT, WINDOW_FRAMES, WINDOW_SAMPLES, log10_mel, normalize_log_mel

_HALF = N_FFT // 2  # the STFT's reach on each side of a frame's centre (and its reflect padding)


@dataclass
class RawWindow:
    """One window's log10 mel before Whisper's clamp."""

    index: int
    log_mel: np.ndarray  # float64 (n_mels, frames), frames <= 3000 (fewer only for the last window)
    peak: float
    floor: float  # the smallest value: the clamp changes this window only if it rises above it

    def clamped(self, peak: float) -> np.ndarray:
        """float32 (n_mels, 3000) exactly as `audio_to_windows` makes it when `peak` is the recording's peak."""
        out = np.zeros((self.log_mel.shape[0], WINDOW_FRAMES), dtype=np.float32)
        out[:, : self.log_mel.shape[1]] = normalize_log_mel(self.log_mel, peak)
        return out

    def changed_by(self, old_peak: float, new_peak: float) -> bool:
        """Whether raising the recording's peak from old_peak to new_peak changes this window's clamped mel."""
        return new_peak > old_peak and self.floor < new_peak - 8.0


class MelWindowStream:
    """Feed 16 kHz float32 mono samples; get each 30 s window's raw log-mel as soon as it is complete."""

    def __init__(self, n_mels: int):
        self.n_mels = n_mels
        self.samples_seen = 0
        self.windows_done = 0
        self._buffer = np.zeros(0, np.float32)  # samples from _buffer_start on
        self._buffer_start = 0
        self._finished = False

    def feed(self, samples: np.ndarray) -> list[RawWindow]:
        if self._finished:
            raise RuntimeError("the stream is finished")
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, np.float32)])
        self.samples_seen += len(samples)
        out = []
        # Window k's last frame reaches sample WINDOW_SAMPLES * (k + 1) - HOP_LENGTH + _HALF (exclusive).
        while self.samples_seen >= WINDOW_SAMPLES * (self.windows_done + 1) - HOP_LENGTH + _HALF:
            out.append(self._window(self.windows_done, (self.windows_done + 1) * WINDOW_FRAMES, final=False))
        return out

    def finish(self) -> list[RawWindow]:
        """The windows left once the recording has ended (the last one partial and zero-padded later)."""
        self._finished = True
        if self.samples_seen < MIN_SAMPLES:  # the reference pads recordings shorter than 1 s with silence
            self._buffer = np.concatenate([self._buffer, np.zeros(MIN_SAMPLES - self.samples_seen, np.float32)])
            self.samples_seen = MIN_SAMPLES
        n_frames = self.samples_seen // HOP_LENGTH
        out = []
        while self.windows_done * WINDOW_FRAMES < n_frames:
            out.append(self._window(self.windows_done, min((self.windows_done + 1) * WINDOW_FRAMES, n_frames), final=True))
        return out

    def _window(self, k: int, last_frame: int, final: bool) -> RawWindow:
        first_frame = k * WINDOW_FRAMES
        # Samples of the padded signal (x shifted right by _HALF) from first_frame * HOP_LENGTH on.
        start = first_frame * HOP_LENGTH - _HALF  # as an index into x; -_HALF for window 0
        piece = self._buffer[max(start, 0) - self._buffer_start :].astype(np.float64)
        if not final:
            piece = piece[: (last_frame - 1) * HOP_LENGTH + N_FFT - (max(start, 0) - start)]
        pad = (_HALF if start < 0 else 0, _HALF if final else 0)
        padded = np.pad(piece, pad, mode="reflect") if any(pad) else piece
        log_mel = log10_mel(padded, first_frame, last_frame, self.n_mels, offset=first_frame * HOP_LENGTH)
        self.windows_done += 1
        # Keep only what the next window reaches back to.
        keep_from = self.windows_done * WINDOW_SAMPLES - _HALF
        self._buffer = self._buffer[keep_from - self._buffer_start :]
        self._buffer_start = keep_from
        return RawWindow(k, log_mel, float(log_mel.max()), float(log_mel.min()))
