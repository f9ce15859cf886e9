"""Fast tests of the demo-corpus recipe (no Piper model load, no Whisper)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from fastslm.models.demo import augment, corpus, tasks, texts

JFK = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@pytest.fixture(scope="module")
def sets() -> texts.SentenceSets:
    """The real sentence sets; skipped, naming the packages, where Debian's fortunes / WordNet are not installed."""
    try:
        texts.require_sources()
    except texts.MissingTextSources as exc:
        pytest.skip(f"needs Debian packages: {exc}")
    return texts.load_sentences(seed=0)


# ------------------------------------------------------------------------------------ texts
def test_sentence_split_is_deterministic_and_disjoint(sets):
    again = texts.load_sentences(seed=0)
    assert again.train == sets.train and again.heldout == sets.heldout
    train_keys = {texts.normalize_key(s) for s in sets.train}
    held_keys = {texts.normalize_key(s) for s in sets.heldout}
    assert len(train_keys) == len(sets.train) and len(held_keys) == len(sets.heldout)  # deduped
    assert not train_keys & held_keys
    assert 15000 <= len(sets.train) <= 25000
    assert len(sets.heldout) >= 300
    # the split is a property of the sentence alone
    assert all(texts.split_of(s) == "heldout" for s in sets.heldout[:50])
    assert all(texts.split_of(s) == "train" for s in sets.train[:50])
    assert texts.split_of("Hello  there, WORLD!") == texts.split_of("hello there world")
    # another seed reshuffles and changes the templates but never moves a sentence across
    other = texts.load_sentences(seed=1)
    assert not {texts.normalize_key(s) for s in other.train} & held_keys


def test_sources_and_form(sets):
    assert {sets.source[s] for s in sets.train} == {"fortune", "wordnet", "template"}
    for s in sets.train[:2000] + sets.heldout:
        assert s.isascii() and s[0].isupper() and s[-1] in ".?!"
        assert texts.MIN_WORDS <= len(s.split()) <= texts.MAX_WORDS
        assert not any(c.isdigit() for c in s)


def test_jfk_sentence_is_in_no_set(sets):
    jfk_key = texts.normalize_key(JFK)
    assert texts.normalize_key(texts.JFK_SENTENCE) == jfk_key
    for s in sets.train + sets.heldout:
        key = " " + texts.normalize_key(s) + " "
        assert " ask not " not in key and " what your country " not in key and " for your country " not in key
        assert not texts.is_jfk_like(s)
    for probe in (JFK, "Ask not what your country can do for you.", "Ask what you can do for your country!",
                  "My fellow Americans, ask what you can do.", "What can you do for your nation?"):
        assert texts.is_jfk_like(probe) and texts.clean_sentence(probe) is None
    assert not texts.is_jfk_like("My fellow citizens, we must defend our country.")
    # the civic / speech vocabulary is there
    vocab = {w for s in sets.train for w in texts.normalize_key(s).split()}
    assert {"fellow", "citizens", "country", "nation", "freedom", "ask", "americans"} <= vocab


def test_number_words():
    assert texts.number_words(0) == "zero"
    assert texts.number_words(25) == "twenty five"
    assert texts.number_words(1205) == "one thousand two hundred five"
    assert texts.ordinal_words(3) == "third" and texts.ordinal_words(20) == "twentieth"
    assert texts.ordinal_words(21) == "twenty first"
    assert texts.year_words(1961) == "nineteen sixty one" and texts.year_words(1905) == "nineteen oh five"
    assert texts.year_words(2004) == "two thousand four"


# ------------------------------------------------------------------------------------ tasks
def test_task_answers():
    t = "Don't panic, Mister Smith! The train leaves at seven."
    assert tasks.words(t) == ["don't", "panic", "mister", "smith", "the", "train", "leaves", "at", "seven"]
    assert tasks.answer("What is the first word?", t) == "don't"
    assert tasks.answer("which word comes LAST?", t) == "seven"
    assert tasks.answer("How many words were said?", t) == "9"
    assert tasks.answer("Summarize in three words.", t) == "panic mister smith"
    assert tasks.answer("Is the word train said?", t) == "yes"
    assert tasks.answer("Was the word plane said?", t) == "no"
    # repeated content words count once; stopwords fill up when content words run out
    assert tasks.summary("The dog saw the dog and a cat.") == "dog saw cat"
    assert tasks.summary("It is what it is.") == "it is what"
    assert tasks.summary("We can go now.") == "we go now"
    assert tasks.answer("How many words are in the recording?", "A rush-hour train.") == "3"
    with pytest.raises(ValueError):
        tasks.answer("What is the weather?", t)


def test_questions_for_matches_oracle(sets):
    rng = random.Random(0)
    kinds = set()
    for s in sets.heldout[:200]:
        qa = tasks.questions_for(s, rng)
        assert len(qa) == 5
        for q, a in qa:
            assert a == tasks.answer(q, s) and a and len(a.split()) <= 3
            kinds.add(q.split()[0])
    assert {"What", "Which", "How", "Summarize", "Give", "Is", "Was"} <= kinds


# ---------------------------------------------------------------------------------- augment
def _tone(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)


@pytest.mark.parametrize("snr", [15.0, 25.0, 40.0])
@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_noise_snr(snr, color):
    x = _tone()
    y = augment.add_noise(x, snr, np.random.default_rng(1), color)
    assert y.dtype == np.float32 and y.shape == x.shape
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(measured - snr) < 0.1


def test_augment_lengths_and_determinism():
    x = _tone()
    rng = np.random.default_rng(0)
    for y in (augment.add_reverb(x, rng, 0.5, 0.5), augment.telephone(x), augment.apply_gain(x, -6.0)):
        assert y.dtype == np.float32 and y.shape == x.shape and np.isfinite(y).all()
    r = augment.add_reverb(x, rng, 0.5, 0.5)
    assert np.sqrt(np.mean(r**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-3)
    assert np.max(np.abs(augment.apply_gain(x, -6.0))) == pytest.approx(10 ** (-6 / 20) * np.max(np.abs(x)), rel=1e-5)
    for f in (0.9, 1.1):
        assert len(augment.change_speed(x, f)) == pytest.approx(len(x) / f, abs=2)
    assert len(augment.pad_silence(x, 0.25, 0.5)) == len(x) + 12000
    # telephone removes the band below 300 Hz and keeps the band inside
    spec = np.abs(np.fft.rfft(augment.telephone(x)))
    f = np.fft.rfftfreq(len(x), 1 / 16000)
    assert spec[np.argmin(np.abs(f - 220))] < 1e-3 * spec[np.argmin(np.abs(f - 1500))]
    prng = random.Random(3)
    for _ in range(30):
        params = augment.sample_augment(prng)
        json.dumps(params)
        y1, y2 = augment.apply_augment(x, params), augment.apply_augment(x, params)
        assert np.array_equal(y1, y2) and y1.dtype == np.float32 and np.max(np.abs(y1)) <= 0.99 + 1e-6
        expected = len(x) / params.get("speed", 1.0) + 16000 * sum(params.get("pad", [0, 0]))
        assert abs(len(y1) - expected) <= 3
        if "noise" in params:
            assert 15.0 <= params["noise"]["snr_db"] <= 40.0


# ----------------------------------------------------------------------------------- corpus
def _small_sets() -> texts.SentenceSets:
    rng = random.Random(0)
    train = [f"Sentence number {texts.number_words(i)} is here." for i in range(40)]
    held = [f"Held out line {texts.number_words(i)} stays out." for i in range(17)]
    rng.shuffle(train)
    return texts.SentenceSets(train=train, heldout=held, source={})


def _fake_synth(voice: str, text: str, params: dict) -> np.ndarray:
    n = 1600 + 160 * len(text)
    return (0.1 * np.sin(np.arange(n) * 0.05 * (1 + len(voice) % 5))).astype(np.float32)


class _Killed(Exception):
    pass


def _plan(mix: str = "shipped", n_train: int = 30):
    return corpus.plan(seed=0, n_train=n_train, sentences=_small_sets(), n_eval_seen=6, n_eval_unseen=4, n_calib=2,
                       n_gate=3, n_select=2, mix=mix)


def test_plan_is_deterministic_and_mixes_voices():
    a, b = _plan(), _plan()
    for split in corpus.SPLITS:
        assert [(u.id, u.text, u.voice, u.params) for u in a[split]] == [(u.id, u.text, u.voice, u.params) for u in b[split]]
    assert {u.voice for u in a["eval_unseen"]} == {corpus.voices.HELDOUT_VOICE}
    assert corpus.voices.HELDOUT_VOICE not in {u.voice for u in a["train"] + a["eval_seen"]}
    assert not {u.text for u in a["eval_seen"]} & {u.text for u in a["eval_unseen"]}
    assert all(u.params["augment"] is None for u in a["eval_seen"] + a["eval_unseen"])
    big = _plan(n_train=600)["train"]
    piper = sum(u.voice.startswith("piper:") for u in big) / len(big)
    augmented = sum(u.params["augment"] is not None for u in big) / len(big)
    assert 0.58 < piper < 0.75 and 0.4 < augmented < 0.6
    # a longer run starts with the same utterances
    assert [u.params for u in big[:30]] == [u.params for u in a["train"]]


def test_wide_mix_varies_training_audio_and_keeps_the_eval_splits():
    shipped, wide = _plan("shipped", 800), _plan("wide", 800)
    for split in ("eval_seen", "eval_unseen"):  # what the gates and the shipped subset score never moves
        assert [(u.text, u.voice, u.params) for u in shipped[split]] == [(u.text, u.voice, u.params) for u in wide[split]]
    train = wide["train"]
    piper = [u for u in train if u.voice.startswith("piper:")]
    augmented = [u.params["augment"] for u in train if u.params["augment"] is not None]
    assert 0.42 < len(piper) / len(train) < 0.58 and 0.62 < len(augmented) / len(train) < 0.78
    voices_used = {u.voice for u in train}
    assert set(corpus.voices.ESPEAK_EXTRA_VOICES) <= voices_used and corpus.voices.HELDOUT_VOICE not in voices_used
    assert max(u.params["synth"]["length_scale"] for u in piper) > 1.25  # wider than the shipped mix's range
    assert sum("pitch" in a for a in augmented) > 0.3 * len(augmented)
    assert sum("lowpass" in a for a in augmented) > 0.05 * len(augmented)
    assert min(a["noise"]["snr_db"] for a in augmented if "noise" in a) < 15.0


def test_calibration_split_is_disjoint_from_everything_scored(sets):
    plan = corpus.plan(seed=0, n_train=0, sentences=sets)
    key = texts.normalize_key
    calib = {key(u.text) for u in plan["calib"]}
    assert len(calib) == corpus.N_CALIB
    scored = {key(u.text) for split in ("eval_seen", "eval_unseen") for u in plan[split]}
    assert not calib & scored
    shipped = corpus.shipped_subset_keys()
    assert len(shipped) == 60 and not calib & shipped
    assert not calib & {key(s) for s in sets.train} and not any(texts.is_jfk_like(u.text) for u in plan["calib"])
    assert all(u.params["augment"] is None or "seed" in u.params["augment"] for u in plan["calib"])
    assert corpus.voices.HELDOUT_VOICE not in {u.voice for u in plan["calib"]}


@pytest.mark.parametrize("split, size", [("gate", 200), ("select", 40)])
def test_gate_and_select_splits_are_clean_training_voices_disjoint_from_every_other_split(sets, split, size):
    """The INT8 WER gate scores the gate split and checkpoint selection the select split: none of their
    sentences is in a set the recipe reports (eval_seen, eval_unseen, jfk), in the shipped test subset, in
    calibration, in training or in the other one."""
    plan = corpus.plan(seed=0, n_train=0, sentences=sets)
    key = texts.normalize_key
    held = {key(u.text) for u in plan[split]}
    assert len(held) == {"gate": corpus.N_GATE, "select": corpus.N_SELECT}[split] == size
    others = {key(u.text) for other in corpus.SPLITS if other not in (split, "train") for u in plan[other]}
    assert not held & others and not held & corpus.shipped_subset_keys()
    assert not held & {key(s) for s in sets.train} and not any(texts.is_jfk_like(u.text) for u in plan[split])
    assert all(u.params["augment"] is None for u in plan[split])
    voices_used = {u.voice for u in plan[split]}
    assert corpus.voices.HELDOUT_VOICE not in voices_used and len(voices_used) >= 8
    # adding the split moved nothing that was built before it
    before = corpus.plan(seed=0, n_train=5, sentences=sets, **{f"n_{split}": 0})
    after = corpus.plan(seed=0, n_train=5, sentences=sets)
    for other in ("eval_seen", "eval_unseen", "calib", "gate", "train"):
        if other != split:
            assert [(u.id, u.text, u.voice, u.params) for u in before[other]] == \
                   [(u.id, u.text, u.voice, u.params) for u in after[other]]


def test_pitch_shift_and_lowpass_keep_length_and_move_what_they_should():
    sr = augment.SAMPLE_RATE
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    shifted = augment.shift_pitch(tone, 1200.0)  # one octave up
    assert len(shifted) == len(tone)
    peak_hz = np.argmax(np.abs(np.fft.rfft(shifted[2000:-2000]))) * sr / (len(tone) - 4000)
    assert abs(peak_hz - 400) < 10
    two = tone + (0.5 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    low = augment.telephone(two, sr, low=0.0, high=4000.0)
    spec = np.abs(np.fft.rfft(low))
    assert spec[6000] < 1e-3 * spec[200] and abs(spec[200] - np.abs(np.fft.rfft(two))[200]) < 1e-3 * spec[200]
    params = {"seed": 3, "pitch": -300, "lowpass": 5000, "gain_db": -6.0}
    a, b = augment.apply_augment(tone, params), augment.apply_augment(tone, params)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(tone)


def test_manifest_resume(tmp_path: Path):
    the_plan = _plan()
    utts = the_plan["train"]
    calls = {"n": 0}

    def dying_synth(voice, text, params):
        calls["n"] += 1
        if calls["n"] > 12:
            raise _Killed
        return _fake_synth(voice, text, params)

    with pytest.raises(_Killed):
        corpus.build_split(tmp_path, "train", utts, synth=dying_synth, progress=False)
    manifest = tmp_path / "train.jsonl"
    assert len(manifest.read_text().splitlines()) == 12
    # simulate a kill in the middle of the next steps: a torn manifest line, an audio file
    # without its manifest line, a leftover temporary file, a broken audio file
    with manifest.open("a") as f:
        f.write('{"id": "train-0000')
    audio_dir = tmp_path / "audio" / "train"
    corpus._write_audio(audio_dir / f"{utts[12].id}.flac", corpus.render(utts[12], _fake_synth))
    (audio_dir / f"{utts[13].id}.tmp.flac").write_bytes(b"partial")
    (audio_dir / f"{utts[14].id}.flac").write_bytes(b"not a flac")

    calls["n"] = 0
    made = corpus.build_split(tmp_path, "train", utts, synth=lambda *a: (calls.__setitem__("n", calls["n"] + 1), _fake_synth(*a))[1], progress=False)
    assert made == len(utts) - 13 and calls["n"] == made
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert sorted(ids) == sorted(u.id for u in utts) and len(set(ids)) == len(ids)
    assert not list(audio_dir.glob("*.tmp.flac"))
    by_id = {u.id: u for u in utts}
    import soundfile as sf

    for r in lines:
        assert set(r) == {"id", "text", "voice", "params", "seconds", "path"}
        assert r["text"] == by_id[r["id"]].text and r["voice"] == by_id[r["id"]].voice
        info = sf.info(str(tmp_path / r["path"]))
        assert info.samplerate == 16000 and info.channels == 1
        assert r["seconds"] == pytest.approx(info.frames / 16000, abs=1e-3)
    # a third run has nothing to do and changes nothing
    before = manifest.read_bytes()
    assert corpus.build_split(tmp_path, "train", utts, synth=dying_synth, progress=False) == 0
    assert manifest.read_bytes() == before
    # another seed in the same folder is refused
    other = corpus.plan(seed=1, n_train=30, sentences=_small_sets(), n_eval_seen=6, n_eval_unseen=4,
                        n_calib=2, n_gate=3, n_select=2, mix="shipped")["train"]
    with pytest.raises(SystemExit):
        corpus.build_split(tmp_path, "train", other, synth=_fake_synth, progress=False)


def test_check_counts(tmp_path: Path):
    the_plan = _plan()
    for split in corpus.SPLITS:
        corpus.build_split(tmp_path, split, the_plan[split], synth=_fake_synth, progress=False)
    result = corpus.check(tmp_path)
    assert {s: r["utterances"] for s, r in result.items()} == {"eval_seen": 6, "eval_unseen": 4, "calib": 2,
                                                                   "gate": 3, "select": 2, "train": 30}
    assert all(r["hours"] > 0 for r in result.values())


def test_missing_text_packages_are_one_error_line(tmp_path, monkeypatch, capsys):
    """Without Debian's fortunes / WordNet the sentence lists (and so every split) would silently differ."""
    import functools

    with pytest.raises(texts.MissingTextSources, match=r"apt-get install -y fortunes-min fortunes wordnet-base"):
        texts.require_sources(tmp_path, texts.WORDNET_DIR)
    # Both folders empty, so the outcome is the same whether or not this machine has the packages.
    monkeypatch.setattr(texts, "load_sentences",
                        functools.partial(texts.load_sentences, fortune_dir=tmp_path, wordnet_dir=tmp_path))
    assert corpus.main(["--out", str(tmp_path / "corpus"), "--train-utterances", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastslm.models.demo.corpus: error: {tmp_path / 'fortunes'} is missing: the demo corpus reads "
                   "Debian's fortunes and WordNet; install them with "
                   "`apt-get install -y fortunes-min fortunes wordnet-base`"]
    assert not (tmp_path / "corpus" / "train.jsonl").exists()


# ------------------------------------------------------------------------------------ voices
def test_piper_noise_is_fed_from_the_utterance_seed(tmp_path):
    """The rewrite that makes Piper's audio a function of text and params, on a graph of the same shape."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from fastslm.models.demo import voices

    graph = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["n0"], dtype=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "n0"], ["y"]),
         helper.make_node("Concat", ["y", "y"], ["z"], axis=2),
         helper.make_node("RandomNormalLike", ["z"], ["n1"], dtype=TensorProto.FLOAT),
         helper.make_node("Mul", ["z", "n1"], ["out"])],
        "vits_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "t"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, "t2"])])
    path = tmp_path / "voice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    session = voices._NoiseFeedingSession(onnxruntime.InferenceSession(voices.seeded_noise_model(path)))
    assert sorted(session._pools) == ["noise_0", "noise_1"]
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)

    def run(seed):
        session.rng = np.random.default_rng(seed)
        return session.run(None, {"x": x})[0]

    first, again, other = run(7), run(7), run(8)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    pools = np.random.default_rng(7)
    n0 = pools.standard_normal(voices.NOISE_POOL, dtype=np.float32)[:6].reshape(1, 2, 3)
    n1 = pools.standard_normal(voices.NOISE_POOL, dtype=np.float32)[:12].reshape(1, 2, 6)
    assert np.allclose(first, np.concatenate([x + n0] * 2, axis=2) * n1, atol=1e-6)
    with pytest.raises(ValueError, match="no RandomNormalLike"):
        empty = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(empty), tmp_path / "plain.onnx")
        voices.seeded_noise_model(tmp_path / "plain.onnx")
