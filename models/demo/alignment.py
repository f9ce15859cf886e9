"""When each text token of a training window was said, from Whisper tiny.en's own alignment.

The slot loss (train.py) needs, for every text token of a window, the speech token (time slot)
it was spoken in. Spreading an utterance's tokens over its span by character length is a guess
that misses pauses at punctuation and uneven speaking rates. Whisper already knows better: its
cross-attention alignment heads, read by dynamic time warping (CTranslate2's
``Whisper.align``, the word timestamps of faster-whisper), place each Whisper token on the
50 Hz frame grid of the encoder output, and the features stage stored exactly that encoder
output. This module runs the alignment once per window (~0.05 s each on 2 cores) and maps the
times to the recipe's own tokenizer through character offsets:

    alignment.jsonl   line 1: format, the windows file's and the tokenizer's hashes
                      then per window: {"id": window id, "t": [centre time in s of each token]}

in the order ``train.token_slots`` lists the tokens (utterance by utterance, each encoded
alone). Lines are appended as windows finish, so a killed run resumes; a file made for other
windows or another tokenizer is refused rather than mixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .features import FeatureStore, file_sha256
from .windows import RecipeError, Utterance

FORMAT = "fastslm-demo-alignment"
FRAME_S = 0.02  # one encoder output frame
MAX_TOKEN_S = 0.8  # a token followed by a pause ends here, not when the next one starts
LAST_TOKEN_S = 0.3


def char_times(offsets: list[tuple[int, int]], starts: np.ndarray, n_chars: int) -> np.ndarray:
    """Time of every character of the aligned text: each token's span shared evenly between its
    characters; characters outside every token (spaces dropped by the offsets) take the time of
    the next covered character."""
    ends = np.minimum(np.append(starts[1:], starts[-1] + LAST_TOKEN_S), starts + MAX_TOKEN_S)
    times = np.zeros(n_chars + 1)
    covered = np.zeros(n_chars + 1, dtype=bool)
    for i, (a, b) in enumerate(offsets):
        b = max(b, a + 1)
        times[a:b] = starts[i] + (np.arange(b - a) + 0.5) / (b - a) * (ends[i] - starts[i])
        covered[a:b] = True
    for c in range(n_chars - 1, -1, -1):
        if not covered[c]:
            times[c] = times[c + 1]
    return times


class WindowAligner:
    """Token centre times of one window from its stored tiny.en encoder output."""

    def __init__(self, tiny_en_dir: Path, tokenizer_path: Path, threads: int = 2):
        import ctranslate2
        from tokenizers import Tokenizer

        self._ct2 = ctranslate2
        self.whisper = ctranslate2.models.Whisper(str(tiny_en_dir), device="cpu", compute_type="int8",
                                                  intra_threads=threads)
        self.whisper_tok = Tokenizer.from_file(str(tiny_en_dir / "tokenizer.json"))
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.prefix = [self.whisper_tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
        if None in self.prefix:
            raise RecipeError(f"{tiny_en_dir / 'tokenizer.json'} lacks Whisper's start tokens: is it tiny.en?")

    def __call__(self, features: np.ndarray, texts: list[str], samples: int) -> list[float]:
        """features: (1500, width) encoder output; texts: the window's utterances in order."""
        joined = " " + " ".join(texts)  # Whisper's text starts with a space
        enc = self.whisper_tok.encode(joined, add_special_tokens=False)
        view = self._ct2.StorageView.from_array(np.ascontiguousarray(features[None].astype(np.float32)))
        result = self.whisper.align(view, self.prefix, [enc.ids], [samples // 160])[0]
        starts = np.full(len(enc.ids), np.nan)
        for token, frame in result.alignments:  # (token index, frame) pairs; a token's first frame is its start
            if token < len(enc.ids) and np.isnan(starts[token]):
                starts[token] = frame * FRAME_S
        for i in range(len(starts)):  # a token the path skipped starts with its predecessor
            if np.isnan(starts[i]):
                starts[i] = starts[i - 1] if i else 0.0
        times = char_times(enc.offsets, starts, len(joined))
        centres, pos = [], 1
        for text in texts:
            for a, b in self.tok.encode(text, add_special_tokens=False).offsets:
                centres.append(round(float(times[pos + a:pos + max(b, a + 1)].mean()), 3))
            pos += len(text) + 1
        return centres


def _header(windows_path: Path, tokenizer_path: Path) -> dict:
    return {"format": FORMAT, "windows_sha256": file_sha256(windows_path),
            "tokenizer_sha256": file_sha256(tokenizer_path)}


def _read(path: Path, header: dict) -> list[dict]:
    try:
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]  # a torn last line is redone
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is damaged ({exc}): delete it and rerun the align stage") from None
    if not rows or rows[0] != header:
        raise RecipeError(f"{path} was made for other windows or another tokenizer: delete it and rerun the "
                          "align stage")
    return rows[1:]


def align_windows(windows: list[dict], utterances: dict[str, Utterance], store: FeatureStore, aligner: WindowAligner,
                  out: Path, windows_path: Path, tokenizer_path: Path, progress: bool = True) -> int:
    """Appends the windows not yet in `out`; returns how many were aligned now."""
    header = _header(windows_path, tokenizer_path)
    done = _read(out, header) if out.is_file() else []
    if not out.is_file():
        out.write_text(json.dumps(header) + "\n")
    else:  # drop a torn last line before appending
        out.write_text("".join(json.dumps(r) + "\n" for r in [header] + done))
    with out.open("a") as f:
        for w in tqdm(range(len(done), len(windows)), initial=len(done), total=len(windows), desc="align",
                      unit="window", disable=not progress, mininterval=5):
            win = windows[w]
            times = aligner(store[w], [utterances[u].text.strip() for u in win["utts"]], win["samples"])
            f.write(json.dumps({"id": win["id"], "t": times}) + "\n")
            f.flush()
    return len(windows) - len(done)


def load_alignment(out: Path, windows: list[dict], windows_path: Path, tokenizer_path: Path) -> dict[str, list[float]]:
    """Window id -> token centre times; every window must be aligned."""
    if not out.is_file():
        raise RecipeError(f"{out} is missing: run the align stage (or train with --slot-timing chars)")
    rows = _read(out, _header(windows_path, tokenizer_path))
    if len(rows) < len(windows):
        raise RecipeError(f"{out} aligns {len(rows)} of {len(windows)} windows: rerun the align stage (it resumes)")
    return {r["id"]: r["t"] for r in rows}
