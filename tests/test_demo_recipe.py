"""The demo-model recipe on a tiny synthetic corpus: windows, feature shards, training, metrics."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fastslm.models.demo import evaluate, features, tasks, train
from fastslm.models.demo.features import FeatureStore, extract_features, file_sha256
from fastslm.models.demo.windows import (
    WindowOptions, build_windows, compose_windows, load_windows, read_corpus, window_audio,
)
from fastslm.models.fastslm import FastSLMConfig
from fastslm.models.hfq_former import HFQFormerDims
from fastslm.models.qwen3 import Qwen3Dims
from fastslm.models.torch_backend import TorchBackend
from fastslm.models.whisper_encoder import WhisperEncoder, WhisperEncoderDims
from fastslm.runtime.audio import SAMPLE_RATE, WINDOW_SAMPLES
from fastslm.runtime.generate import Pipeline, SpeechTokens
from fastslm.runtime.prompt import resolve_task
from fastslm.runtime.tokenizer import Tokenizer, train_bpe_tokenizer

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things.",
    "We met at the station at half past six.",
    "Forty two people came to the market on Monday.",
    "The river is quiet in the morning.",
    "Is the library open on Friday evening?",
    "My friends bought seven tickets for the train.",
    "A simple answer is often the best one.",
    "The captain read the letter twice.",
    "Green apples are sold in the village.",
    "Our teacher told us a long story.",
    "Bright birds sing in the garden.",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """train.jsonl + FLAC 'utterances' (tones with noise), 1.5-8 s long."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio" / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, text in enumerate(SENTENCES):
        seconds = 1.5 + 6.5 * i / (len(SENTENCES) - 1)
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        rel = f"audio/train/train-{i:06d}.flac"
        sf.write(root / rel, audio.astype(np.float32), SAMPLE_RATE)
        lines.append({"id": f"train-{i:06d}", "text": text, "voice": "test", "params": {}, "seconds": round(seconds, 2),
                      "path": rel})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


TINY_WHISPER = WhisperEncoderDims(n_mels=80, n_ctx=1500, width=32, n_heads=2, n_layers=1)


def tiny_encoder() -> WhisperEncoder:
    torch.manual_seed(0)
    return WhisperEncoder(TINY_WHISPER).eval()


def tiny_demo_config(vocab_size: int) -> FastSLMConfig:
    return FastSLMConfig(
        whisper=TINY_WHISPER,
        hfq_former=HFQFormerDims(width=32, n_heads=2, n_frames=1500, stage_queries=(8, 8, 8), n_queries=5,
                                 n_out_blocks=1, llm_dim=32),
        qwen3=Qwen3Dims(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=16, rope_theta=10_000.0, max_position_embeddings=1024),
    )


@pytest.fixture(scope="module")
def recipe(corpus, tmp_path_factory):
    """windows.jsonl and feature shards (tiny random encoder) of the synthetic corpus."""
    work = tmp_path_factory.mktemp("work")
    utts = read_corpus(corpus / "train.jsonl")
    windows = build_windows(utts, work / "windows.jsonl", WindowOptions(seed=0, passes=1.0))
    stats = extract_features(windows, {u.id: u for u in utts}, tiny_encoder(), work / "features",
                             file_sha256(work / "windows.jsonl"), shard_size=2, batch_size=2, progress=False)
    assert stats.computed == len(windows)
    tok = train_bpe_tokenizer(list(SENTENCES) * 3 + ["What is the first word?", "yes", "no"], vocab_size=300)
    tok.save(str(work / "tokenizer.json"))
    return {"work": work, "utts": utts, "windows": windows, "tokenizer": Tokenizer.from_file(work / "tokenizer.json")}


# ---------------------------------------------------------------------------------------------
# windows


def test_windows_fit_in_30s_and_are_deterministic(corpus):
    utts = read_corpus(corpus / "train.jsonl")
    options = WindowOptions(seed=3, passes=4.0)
    windows = compose_windows(utts, options)
    assert windows == compose_windows(utts, options)
    assert windows != compose_windows(utts, WindowOptions(seed=4, passes=4.0))
    assert sum(len(w["utts"]) for w in windows) == 4 * len(utts)  # every utterance, once per pass
    assert any(len(w["utts"]) == 1 for w in windows) and any(len(w["utts"]) >= 3 for w in windows)
    by_id = {u.id: u for u in utts}
    for w in windows[:12]:
        audio = window_audio(w, by_id)
        assert len(audio) <= WINDOW_SAMPLES and len(audio) <= w["samples"]
        assert w["text"] == " ".join(by_id[u].text for u in w["utts"])
        assert all(int(0.1 * SAMPLE_RATE) <= g <= int(0.8 * SAMPLE_RATE) for g in w["gaps"])
    # the audio is the utterances with silent gaps between them
    w = next(w for w in windows if len(w["utts"]) >= 2)
    audio, first = window_audio(w, by_id), sf.read(by_id[w["utts"][0]].path, dtype="float32")[0]
    np.testing.assert_array_equal(audio[: len(first)], first)
    assert not audio[len(first) : len(first) + w["gaps"][0]].any()


def test_window_examples_use_inference_prompts(recipe):
    for w in recipe["windows"]:
        asr = w["examples"][0]
        assert (asr["task"], asr["instruction"]) == ("ASR", resolve_task(None)[1]) and asr["answer"] == w["text"]
        for ex in w["examples"][1:]:
            task, instruction = resolve_task(ex["instruction"])
            assert (task.name, instruction) == (ex["task"], ex["instruction"])
            assert ex["answer"] == evaluate.tasks.answer(ex["instruction"], w["text"])
    assert load_windows(recipe["work"] / "windows.jsonl") == recipe["windows"]


# ---------------------------------------------------------------------------------------------
# features


def test_feature_shards_resume_after_a_kill(recipe, tmp_path, monkeypatch):
    utts = {u.id: u for u in recipe["utts"]}
    windows, sha = recipe["windows"], file_sha256(recipe["work"] / "windows.jsonl")
    calls = {"n": 0}
    real = features._encode_batch

    def dies_on_second_call(encoder, mel, tuned_top_blocks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(encoder, mel, tuned_top_blocks)

    monkeypatch.setattr(features, "_encode_batch", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        extract_features(windows, utts, tiny_encoder(), tmp_path, sha, shard_size=2, batch_size=2, progress=False)
    monkeypatch.setattr(features, "_encode_batch", real)
    assert (tmp_path / "shard_00000.npy").is_file() and not (tmp_path / "shard_00001.npy").is_file()
    stats = extract_features(windows, utts, tiny_encoder(), tmp_path, sha, shard_size=2, batch_size=2, progress=False)
    assert stats.skipped == 2 and stats.computed == len(windows) - 2
    done = recipe["work"] / "features"
    for shard in sorted(done.glob("shard_*.npy")):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()
    store = FeatureStore(tmp_path)
    assert len(store) == len(windows) and store[len(windows) - 1].shape == (1500, 32)
    # a different windows file is refused, not mixed in
    with pytest.raises(features.RecipeError):
        extract_features(windows, utts, tiny_encoder(), tmp_path, "other", shard_size=2, progress=False)


# ---------------------------------------------------------------------------------------------
# training


def tiny_trainer(recipe, out: Path, token_times: dict | None = None, features: str = "features",
                 **overrides) -> train.Trainer:
    tok = recipe["tokenizer"]
    config = tiny_demo_config(-(-tok.vocab_size // 64) * 64)
    options = train.TrainOptions(**{"seed": 0, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "steps": 4,
                                    "eval_minutes": 0, "eval_every": 0, "log_every": 2,
                                    **overrides})
    model = train.new_model(config, options.seed, tiny_encoder(), options.tune_encoder_blocks)
    return train.Trainer(model, tok, recipe["windows"], FeatureStore(recipe["work"] / features), out, options,
                         progress=False, utterances={u.id: u for u in recipe["utts"]},
                         reading_texts=[u.text for u in recipe["utts"]], token_times=token_times)


def test_training_sequence_is_the_pipeline_prefill(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path)
    model = trainer.model.eval()
    feats = torch.from_numpy(np.asarray(trainer.features[0], dtype=np.float32))[None]
    example = {"task": "SQQA", "instruction": "What is the first word?", "answer": "the"}
    batch = trainer.examples.batch(feats.numpy(), [example], qa_weight=1.0)
    seq, start, answer_at, after_thinking = trainer.examples.sequence(example)
    assert after_thinking == answer_at  # no thinking in this example
    with torch.no_grad():
        speech = model.audio_tower.hfq_former(feats)
        text = model.llm.embed(batch.ids)
        q = model.config.tokens_per_window
        embeds = torch.cat([text[:, :start], speech, text[:, start + q :]], dim=1)
        logits = model.llm(inputs_embeds=embeds).logits[0, answer_at - 1].numpy()
    pipe = Pipeline(TorchBackend(model), recipe["tokenizer"])
    prefill = pipe.prefill(SpeechTokens(speech[0].numpy(), 1, 3.0), "What is the first word?")
    assert prefill.prompt_tokens == answer_at
    np.testing.assert_allclose(prefill.logits, logits, atol=1e-4)
    # loss sits on the answer ids and <|im_end|> only
    assert batch.targets[0, answer_at:].tolist() == seq[answer_at:]
    assert (batch.targets[0, :answer_at] == -100).all() and seq[-1] == recipe["tokenizer"].token_id("<|im_end|>")


def test_training_steps_reduce_the_loss(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0)
    batch = trainer.batch_for(0)
    with torch.no_grad():
        before = float(train.forward_loss(trainer.model, batch)[0])
    for _ in range(3):
        trainer.train_step(batch)
    with torch.no_grad():
        after = float(train.forward_loss(trainer.model, batch)[0])
    assert after < before - 0.1


def test_checkpoint_resume_is_bit_identical(recipe, tmp_path):
    straight = tiny_trainer(recipe, tmp_path / "a")
    assert straight.run()["finished"]
    first = tiny_trainer(recipe, tmp_path / "b")
    assert not first.run(max_steps=2)["finished"]
    resumed = tiny_trainer(recipe, tmp_path / "b")  # a fresh process would do exactly this
    assert resumed.step == 2
    assert resumed.run()["finished"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 4
    log = [json.loads(x) for x in (tmp_path / "b" / train.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)


def test_trainer_refuses_other_options_on_resume(recipe, tmp_path):
    tiny_trainer(recipe, tmp_path).run(max_steps=1)
    with pytest.raises(train.RecipeError):
        tiny_trainer(recipe, tmp_path, lr=1e-4)


def test_the_encoder_splits_anywhere_into_a_stored_bottom_and_a_head():
    torch.manual_seed(1)
    encoder = WhisperEncoder(WhisperEncoderDims(n_mels=80, n_ctx=1500, width=32, n_heads=2, n_layers=3)).eval()
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        whole = encoder(mel)
        for k in range(4):
            assert torch.equal(encoder.head(encoder.hidden(mel, k), k), whole)


@pytest.fixture(scope="module")
def tuned_features(recipe):
    """The recipe's windows stored as the input of the tiny encoder's last (only) block."""
    folder = recipe["work"] / "features-tune1"
    extract_features(recipe["windows"], {u.id: u for u in recipe["utts"]}, tiny_encoder(), folder,
                     file_sha256(recipe["work"] / "windows.jsonl"), shard_size=2, batch_size=2, progress=False,
                     tuned_top_blocks=1)
    return folder


def test_tuned_encoder_blocks_train_from_their_stored_input(recipe, tuned_features, tmp_path):
    from fastslm.models.demo.features import EncoderOutputs

    store, frozen = FeatureStore(tuned_features), FeatureStore(recipe["work"] / "features")
    assert store.tuned_top_blocks == 1 and frozen.tuned_top_blocks == 0
    # the pretrained block run on the stored input gives the frozen encoder's output (both stored as float16)
    outputs = EncoderOutputs(store, tiny_encoder())
    np.testing.assert_allclose(outputs[0], np.asarray(frozen[0], dtype=np.float32), atol=2e-2)
    assert np.array_equal(EncoderOutputs(frozen, tiny_encoder())[0], frozen[0])
    # stored encoder outputs need no torch encoder (the align stage loads none for them); tuned input does
    assert np.array_equal(EncoderOutputs(frozen, None)[0], frozen[0])
    with pytest.raises(ValueError, match="last 1 blocks"):
        EncoderOutputs(store, None)

    trainer = tiny_trainer(recipe, tmp_path / "run", features="features-tune1", tune_encoder_blocks=1,
                           encoder_lr_scale=0.25, augment_prob=0.0)
    encoder = trainer.model.audio_tower.whisper
    before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    scales = sorted(g.get("lr_scale", 1.0) for g in trainer.optimizer.param_groups)
    assert scales == [0.25, 0.25, 1.0, 1.0]
    assert trainer.run()["finished"]
    after = encoder.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("blocks.0.", "ln_post.")) for k in moved)
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[0.25] == pytest.approx(0.25 * lrs[1.0])

    # the checkpoint carries the tuned block: a fresh model with the pretrained encoder gets it back
    state = torch.load(tmp_path / "run" / train.STATE_FILE, weights_only=True)
    assert set(state["model"]["whisper"]) == {k for k in after if k.startswith(("blocks.0.", "ln_post."))}
    fresh = train.new_model(trainer.model.config, 0, tiny_encoder())
    train.load_trainable_state(fresh, state["model"])
    assert all(torch.equal(v, after[k]) for k, v in fresh.audio_tower.whisper.state_dict().items())
    # and it runs the block itself: speech tokens from the stored input equal the whole model's on audio
    feats = torch.from_numpy(np.asarray(store[0], dtype=np.float32))[None]
    with torch.no_grad():
        tokens = train.speech_from_features(trainer.model.eval(), feats, 1)
        again = fresh.audio_tower.hfq_former(fresh.audio_tower.whisper.head(feats, 0))
    assert torch.allclose(tokens, again, atol=1e-6)


def test_tuned_encoder_blocks_refuse_features_of_another_split(recipe, tuned_features, tmp_path):
    with pytest.raises(train.RecipeError, match="features stage with the same --tune-encoder-blocks"):
        tiny_trainer(recipe, tmp_path / "a", tune_encoder_blocks=1)
    with pytest.raises(train.RecipeError, match="features stage with the same --tune-encoder-blocks"):
        tiny_trainer(recipe, tmp_path / "b", features="features-tune1")
    with pytest.raises(train.RecipeError, match="must be 0 to 1"):
        tiny_trainer(recipe, tmp_path / "c", tune_encoder_blocks=2)
    with pytest.raises(train.RecipeError, match="other features|features of other windows or another encoder"):
        extract_features(recipe["windows"], {u.id: u for u in recipe["utts"]}, tiny_encoder(),
                         recipe["work"] / "features", file_sha256(recipe["work"] / "windows.jsonl"),
                         shard_size=2, progress=False, tuned_top_blocks=1)


# ---------------------------------------------------------------------------------------------
# metrics


def test_wer_uses_whisper_normalisation():
    assert evaluate.wer(["Forty-two apples, Mr. Smith!"], ["42 apples mister smith"]) == 0.0
    assert evaluate.wer(["Hello, World."], ["hello world"]) == 0.0
    assert evaluate.wer(["the cat sat down"], ["the cat sat"]) == 25.0
    assert evaluate.wer(["one two", "three four"], ["one two", "three five six"]) == 50.0  # corpus-level
    assert evaluate.answer_correct("13", " 13.") and evaluate.answer_correct("knowledge torture awareness",
                                                                            "Knowledge, torture, awareness")
    assert not evaluate.answer_correct("yes", "no")


def test_qa_questions_are_seeded_by_utterance():
    items = [evaluate.EvalItem("u1", "We met at the station.", Path("x")),
             evaluate.EvalItem("u2", "Hello there.", Path("y"))]
    qs = evaluate.questions_for_items(items)
    assert qs == evaluate.questions_for_items(items) and len(qs) == 10
    assert {tasks.question_type(q) for _, q, _ in qs} == {"first", "last", "count", "summary", "contains"}
    random.seed(1)  # the global RNG plays no part
    assert qs == evaluate.questions_for_items(items)


def test_schedule_is_sized_from_hours_and_kept_on_resume(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path, steps=None, hours=1e-7, warmup_steps=12, calibrate_steps=5,
                           eval_every=None, eval_minutes=1.0)
    result = trainer.run(max_steps=9)
    assert result["total_steps"] == 13 and trainer.eval_every >= 1  # 0.36 ms of steps: always the warmup floor
    resumed = tiny_trainer(recipe, tmp_path, steps=None, hours=1e-7, warmup_steps=12, calibrate_steps=5,
                           eval_every=None, eval_minutes=1.0)
    assert (resumed.step, resumed.total_steps, resumed.eval_every) == (9, 13, trainer.eval_every)
    assert train.learning_rate(12, 13, resumed.o) == pytest.approx(resumed.o.lr)
    assert train.learning_rate(13, 13, resumed.o) == pytest.approx(resumed.o.lr * resumed.o.min_lr_ratio)


# ---------------------------------------------------------------------------------------------
# Training scaffolding: time-local query init and the CTC term


def compressor_attention(compressor, frames: torch.Tensor) -> torch.Tensor:
    """(Q, T) attention of a Compressor, averaged over heads (its scoring, spelled out)."""
    from fastslm.models.hfq_former import split_heads

    q = compressor.q_ln(compressor.query) + compressor.q_pos_embeds
    k = compressor.kv_ln(frames) + compressor.kv_pos_embeds
    qh, kh = split_heads(q, compressor.n_heads), split_heads(k, compressor.n_heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)[0].mean(0)


def test_time_local_init_spreads_the_queries_over_the_window():
    from fastslm.models.hfq_former import HFQFormer

    dims = HFQFormerDims(width=384, n_heads=6, n_frames=1500, stage_queries=(80, 80, 80), n_queries=50, llm_dim=32)
    frames = torch.randn(1, 1500, 384, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    hfq_former = HFQFormer(dims)
    with torch.no_grad():
        before = compressor_attention(hfq_former.compressor1, frames)
        train.init_time_local_queries_(hfq_former)
        after = compressor_attention(hfq_former.compressor1, frames)
    centres = ((torch.arange(80) + 0.5) * 1500 / 80).long()
    near = lambda a: float(np.mean([a[i, max(0, c - 30) : c + 30].sum() for i, c in enumerate(centres.tolist())]))  # noqa: E731
    # random queries read the first frames (query i peaks at frame i); the init moves each to its slice
    assert before.argmax(-1)[40:].float().mean() < 200 and near(before) < 0.1
    assert (after.argmax(-1) - centres).abs().max() <= 20 and near(after) > 0.5


def test_token_slots_follow_the_window_timeline(recipe):
    """Tokens land in the slots of their utterance's span, in order, and the gap stays silent."""
    from fastslm.models.demo.windows import Utterance

    tok = recipe["tokenizer"]
    utts = {"a": Utterance("a", "one two three four", 3.0, Path("a.flac")),
            "b": Utterance("b", "five six", 1.2, Path("b.flac"))}
    window = {"utts": ["a", "b"], "gaps": [int(2.4 * SAMPLE_RATE)], "samples": 0}
    pairs = train.token_slots(window, utts, tok, n_slots=50)  # 0.6 s per slot
    assert [i for _, i in pairs] == tok.encode("one two three four") + tok.encode("five six")
    slots = [s for s, _ in pairs]
    assert slots == sorted(slots) and slots[0] == 0 and max(slots[: len(tok.encode("one two three four"))]) == 4
    b_slots = slots[len(tok.encode("one two three four")) :]
    assert min(b_slots) >= 9 and max(b_slots) <= 10  # b spans 5.4 .. 6.6 s
    targets, weights = train.slot_targets([pairs], 50, tok.vocab_size, silent_weight=0.2)
    assert torch.allclose(targets.sum(-1), torch.ones(1, 50))
    assert targets[0, 6, tok.vocab_size] == 1.0 and weights[0, 6] == 0.2 and weights[0, 0] == 1.0


def test_aligned_slot_timing_uses_the_token_times(recipe, tmp_path):
    """--slot-timing whisper: each window's slots come from its aligned token times (here: every
    token at 7.0 s -> slot 1 of the tiny model's 5, 6 s each), and training without the times is refused."""
    utts = {u.id: u for u in recipe["utts"]}
    tok = recipe["tokenizer"]
    times = {w["id"]: [7.0] * sum(len(tok.encode(utts[u].text.strip())) for u in w["utts"])
             for w in recipe["windows"]}
    trainer = tiny_trainer(recipe, tmp_path / "a", token_times=times, slot_timing="whisper")
    assert trainer.model.config.tokens_per_window == 5
    assert all({s for s, _ in slots} == {1} for slots in trainer._slots)
    assert trainer._slots != tiny_trainer(recipe, tmp_path / "b")._slots  # "chars" spreads them out
    with pytest.raises(train.RecipeError, match="align stage"):
        tiny_trainer(recipe, tmp_path / "c", slot_timing="whisper")


def test_slot_loss_trains_the_speech_tokens(recipe, tmp_path):
    """The slot loss falls as the HFQ-Former, head and embeddings train on it (the LLM loss switched off)."""
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0)
    batch = trainer.batch_for(0)
    hfq_former = trainer.model.audio_tower.hfq_former
    params = [*hfq_former.parameters(), *trainer.slot_head.parameters(), trainer.model.llm.model.embed_tokens.weight]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(20):
        embeddings = trainer.model.llm.model.embed_tokens.weight
        loss = train.slot_cross_entropy(trainer.slot_head(hfq_former(batch.features), embeddings), batch.slots,
                                        batch.slot_weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_reading_windows_fit_the_timeline():
    texts = ["A short one.", "Another sentence that is a little longer than the first.", "Third."]
    rng = np.random.default_rng(0)
    singles = 0
    for _ in range(200):
        window, utts = train.reading_window(texts, rng)
        total = sum(u.seconds for u in utts.values()) + sum(window["gaps"]) / SAMPLE_RATE
        assert 0 < total <= 30.0 and len(window["gaps"]) == len(utts) - 1
        assert window["text"] == " ".join(utts[i].text for i in window["utts"])
        singles += len(utts) == 1
    assert 30 <= singles <= 100  # single_fraction 0.3 (plus windows where nothing else fit)


def test_pseudo_speech_is_the_direction_of_each_slots_embeddings():
    emb = torch.randn(10, 8)
    silence = torch.randn(8)
    speech = train.pseudo_speech([[(0, 3), (0, 5), (2, 7)]], emb, silence, n_slots=4, norm=torch.tensor(2.0))
    assert speech.shape == (1, 4, 8)
    cos = torch.nn.functional.cosine_similarity
    assert cos(speech[0, 0], emb[3] + emb[5], dim=0) > 0.9999 and cos(speech[0, 2], emb[7], dim=0) > 0.9999
    assert cos(speech[0, 1], silence, dim=0) > 0.9999 and cos(speech[0, 3], silence, dim=0) > 0.9999
    assert torch.allclose(speech.norm(dim=-1), torch.full((1, 4), 2.0))


def test_reading_batches_train_and_keep_old_runs_resumable(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0, reading_batch=3)
    batch, reading = trainer.batch_for(0), trainer.reading_for(0)
    assert reading[0].features is None and len(reading[1]) == 3
    again = trainer.reading_for(0)  # seeded by the step, like batch_for
    assert torch.equal(again[0].ids, reading[0].ids) and again[1] == reading[1]
    norm = torch.tensor(1.0)
    with torch.no_grad():
        before = float(train.reading_loss(trainer.model, reading[0], reading[1], trainer.slot_head.silence, norm))
    for _ in range(3):
        trainer.train_step(batch, reading)
    with torch.no_grad():
        after = float(train.reading_loss(trainer.model, reading[0], reading[1], trainer.slot_head.silence, norm))
    assert after < before - 0.1
    # a run started before reading batches existed has the same trajectory key as reading_batch=0
    key = train.TrainOptions(reading_batch=0).trajectory_key()
    assert "reading_batch" not in key and train.TrainOptions(reading_batch=2).trajectory_key()["reading_batch"] == 2


def test_speech_tokens_per_window_is_a_recipe_dimension(tmp_path, monkeypatch):
    import fastslm.models.demo.recipe as recipe
    from fastslm.models.demo.recipe import SPEECH_TOKENS, Paths, demo_config, trained_model

    assert demo_config(2048).hfq_former.n_queries == SPEECH_TOKENS == 150
    dims = demo_config(2048, 50).hfq_former  # FastSLM's own count: the stages keep at least 80 queries
    assert (dims.n_queries, dims.stage_queries) == (50, (80, 80, 80))
    # a checkpoint says its own dims: export and eval rebuild the model from them
    config = demo_config(2048, 150)
    model = train.new_model(config, 0)
    paths = Paths(tmp_path)
    paths.train.mkdir(parents=True)
    torch.save({"step": 3, "model": train.trainable_state(model), "config": config.to_dict()},
               paths.train / train.BEST_FILE)
    monkeypatch.setattr(recipe, "load_tiny_en", lambda: WhisperEncoder(config.whisper))
    loaded, _, step = trained_model(paths)
    assert step == 3 and loaded.config.tokens_per_window == 150
    torch.testing.assert_close(loaded.audio_tower.hfq_former.compressor.query, model.audio_tower.hfq_former.compressor.query)
    # a checkpoint saved before the HFQ-Former had one name keeps it under "adapter"
    state = train.trainable_state(model)
    assert set(state) == {"hfq_former", "llm"}
    torch.save({"step": 4, "model": {"adapter": state["hfq_former"], "llm": state["llm"]}, "config": config.to_dict()},
               paths.train / train.BEST_FILE)
    loaded, _, step = trained_model(paths)
    assert step == 4
    torch.testing.assert_close(loaded.audio_tower.hfq_former.compressor.query, model.audio_tower.hfq_former.compressor.query)


def test_slot_ctc_loss_prefers_the_spoken_order_and_skips_impossible_windows():
    blank, n_slots, vocab = 5, 8, 6
    sequence = [1, 2, 2, 3]
    aligned = torch.full((1, n_slots, vocab), -9.0)
    for slot, token in enumerate([1, blank, 2, blank, 2, 3, blank, blank]):
        aligned[0, slot, token] = 0.0
    aligned = aligned.log_softmax(-1)
    good = float(train.slot_ctc_loss(aligned, [sequence], blank))
    wrong = float(train.slot_ctc_loss(aligned, [[3, 2, 2, 1]], blank))
    assert good < 0.1 < 3.0 < wrong  # per target token (reduction "mean")
    # more tokens than slots: no alignment exists, the window adds nothing (and no NaN)
    both = train.slot_ctc_loss(torch.cat([aligned, aligned]), [sequence, list(range(1, 5)) * 3], blank)
    assert torch.isfinite(both) and float(both) < good + 0.1


def test_ctc_weight_trains_logs_and_refuses_bad_settings(recipe, tmp_path):
    from fastslm.models.demo.recipe import demo_config
    from fastslm.models.demo.windows import RecipeError

    trainer = tiny_trainer(recipe, tmp_path / "ctc", augment_prob=0.0, ctc_weight=0.5)
    batch = trainer.batch_for(0)
    assert batch.sequences == [[t for _, t in trainer._slots[w]] for w in batch.windows]
    answer, aligned, ctc, norm = trainer.train_step(batch)
    assert np.isfinite(ctc) and ctc >= 0.0 and answer > 0.0 and aligned > 0.0 and norm > 0.0
    trainer.run()
    logged = [json.loads(line) for line in (tmp_path / "ctc" / "log.jsonl").read_text().splitlines()]
    assert any("ctc" in r and np.isfinite(r["ctc"]) for r in logged)
    assert tiny_trainer(recipe, tmp_path / "plain").batch_for(0).sequences is None  # no CTC, no sequences
    with pytest.raises(RecipeError, match="--ctc-weight -1.0: give a weight >= 0"):
        tiny_trainer(recipe, tmp_path / "neg", ctc_weight=-1.0)
    with pytest.raises(RecipeError, match="positive --align-weight"):
        tiny_trainer(recipe, tmp_path / "noslot", ctc_weight=0.5, align_weight=0.0)
    with pytest.raises(RecipeError, match="--speech-tokens must be a positive count .* got 0"):
        demo_config(2048, 0)


def test_negative_steps_is_one_error_line(tmp_path, capsys):
    from fastslm.models.demo.recipe import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "w"), "--stage", "train", "--steps", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "--steps must be a step count, or 0" in err[0] and "got -1" in err[0]
    assert not (tmp_path / "w").exists()  # refused before any stage touched the folder
    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "w"), "--stage", "train", "--eval-every", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--eval-every must be a positive step count" in err[0]
    assert not (tmp_path / "w").exists()
    for bad in (["--ema-decay", "1.0"], ["--ema-decay", "0.99", "--ema-from", "-5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--work", str(tmp_path / "w"), "--stage", "train", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "--ema-decay is a decay per step in [0, 1)" in err[0]
    assert not (tmp_path / "w").exists()
    for bad in (["--tune-encoder-blocks", "5"], ["--tune-encoder-blocks", "-1"], ["--encoder-lr-scale", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--work", str(tmp_path / "w"), "--stage", "features", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "--tune-encoder-blocks is 0 to 4" in err[0]
    assert not (tmp_path / "w").exists()


def test_align_stage_is_skipped_or_says_what_is_missing(tmp_path, capsys):
    from fastslm.models.demo.recipe import main

    main(["--work", str(tmp_path / "w"), "--stage", "align"])
    assert "align: skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "w"), "--stage", "align", "--slot-timing", "whisper"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "windows.jsonl is missing" in err[0]


def test_spec_augment_masks_speech_frames_and_keeps_old_runs_resumable():
    """Speech-only time masks land inside each window's audio; the old defaults draw exactly as before."""
    o = train.TrainOptions(augment_prob=1.0, time_masks=4, time_mask_frames=30, channel_masks=2, channel_mask=8,
                           mask_speech_only=True)  # fmt: skip
    feats = torch.randn(3, 1500, 32)
    before = feats.clone()
    train.spec_augment_(feats, np.random.default_rng(0), o, speech_frames=[100, 40, 1500])
    changed_frames = (feats != before).all(dim=2)  # whole frames replaced by the mean frame
    assert changed_frames[0].any() and not changed_frames[0, 100:].any() and not changed_frames[1, 40:].any()
    masked_channels = (feats != before).all(dim=1)  # whole channels (outside the time masks)
    assert all(0 < int(m.sum()) <= 16 for m in masked_channels)
    # without speech_only the same options may mask anywhere in the 30 s
    anywhere = torch.randn(64, 1500, 32)
    copy = anywhere.clone()
    train.spec_augment_(anywhere, np.random.default_rng(0), train.TrainOptions(augment_prob=1.0, time_masks=4,
                        time_mask_frames=30, channel_mask=0), speech_frames=[100] * 64)  # fmt: skip
    assert (anywhere != copy).all(dim=2)[:, 100:].any()
    # the defaults (one channel mask, masks anywhere) keep the draws of runs started before these options
    old_rng, new_rng = np.random.default_rng(5), np.random.default_rng(5)
    a, b = torch.randn(4, 1500, 32), None
    b = a.clone()
    o_default = train.TrainOptions()
    B, T, D = a.shape
    for i in range(B):  # the previous implementation, inlined
        if old_rng.random() >= o_default.augment_prob:
            continue
        fill = a[i].mean(dim=0)
        for _ in range(o_default.time_masks):
            width = int(old_rng.integers(0, o_default.time_mask_frames + 1))
            start = int(old_rng.integers(0, T - width + 1))
            a[i, start : start + width] = fill
        width = int(old_rng.integers(0, o_default.channel_mask + 1))
        start = int(old_rng.integers(0, D - width + 1))
        a[i, :, start : start + width] = fill[start : start + width]
    train.spec_augment_(b, new_rng, o_default, speech_frames=[50] * B)
    assert torch.equal(a, b)
    key = o_default.trajectory_key()
    assert "channel_masks" not in key and "mask_speech_only" not in key and "select_qa_weight" not in key
    assert o.trajectory_key()["mask_speech_only"] is True


def test_best_checkpoint_can_be_picked_on_wer_and_qa(recipe, tmp_path):
    results = iter([{"wer": 40.0, "qa": 20.0}, {"wer": 38.0, "qa": 5.0}, {"wer": 41.0, "qa": 40.0}])
    trainer = tiny_trainer(recipe, tmp_path / "both", select_qa_weight=0.5)
    trainer.evaluator = lambda model: dict(next(results))
    picked = []
    for step in range(3):
        trainer.step = step
        trainer.evaluate()
        picked.append(trainer.best["step"])
    # scores 40 + 40 = 80, 38 + 47.5 = 85.5, 41 + 30 = 71: the QA-poor checkpoint is never best
    assert picked == [0, 0, 2] and trainer.best == {"wer": 41.0, "step": 2, "qa": 40.0, "score": 71.0}
    assert torch.load(tmp_path / "both" / train.BEST_FILE, weights_only=True)["step"] == 2
    wer_only = tiny_trainer(recipe, tmp_path / "wer")
    results = iter([{"wer": 40.0, "qa": 20.0}, {"wer": 38.0, "qa": 5.0}])
    wer_only.evaluator = lambda model: dict(next(results))
    for step in range(2):
        wer_only.step = step
        wer_only.evaluate()
    assert wer_only.best["step"] == 1
    no_qa = tiny_trainer(recipe, tmp_path / "noqa", select_qa_weight=1.0)
    no_qa.evaluator = lambda model: {"wer": 30.0}
    with pytest.raises(train.RecipeError, match="--select-qa-weight needs QA"):
        no_qa.evaluate()


def test_weight_average_is_scored_beside_the_raw_weights_and_resumes(recipe, tmp_path):
    decay = 0.5
    # WER per evaluation call: the raw weights first, then the average once it exists
    wers = iter([50.0, 40.0, 30.0, 35.0, 36.0, 32.0, 29.0])
    seen = []

    def evaluator(model):
        seen.append([p.detach().clone() for p in train.trainable_parameters(model)])
        return {"wer": next(wers)}

    straight = tiny_trainer(recipe, tmp_path / "a", ema_decay=decay, ema_from=2)
    straight.evaluator = evaluator
    params = train.trainable_parameters(straight.model)
    expected = None
    for step in range(4):
        straight.train_step(straight.batch_for(step))
        now = [p.detach().clone() for p in params]
        if straight.step == 2:
            expected = now
        elif straight.step > 2:
            expected = [decay * e + (1 - decay) * n for e, n in zip(expected, now)]
        if straight.step < 2:
            assert straight.ema is None
        else:
            assert all(torch.allclose(t, e, atol=1e-7) for t, e in zip(straight.ema.tensors, expected))
        straight.evaluate()
        assert all(torch.equal(p, n) for p, n in zip(params, now))  # evaluating left the raw weights in place
        assert all(torch.equal(p, n) for p, n in zip(seen[-1 if straight.step < 2 else -2], now))
        if straight.step >= 2:
            assert all(torch.equal(p, t) for p, t in zip(seen[-1], straight.ema.tensors))
    log = [json.loads(x) for x in (tmp_path / "a" / train.LOG_FILE).read_text().splitlines()]
    assert [(r["wer"], r.get("ema", {}).get("wer")) for r in log] == [(50, None), (40, 30), (35, 36), (32, 29)]
    assert [r["best"]["step"] for r in log] == [1, 2, 2, 4] and log[1]["best"]["weights"] == "ema"
    best = torch.load(tmp_path / "a" / train.BEST_FILE, weights_only=True)
    assert best["weights"] == "ema" and best["step"] == 4
    assert straight.best == {"wer": 29.0, "step": 4, "weights": "ema"}
    averaged = dict(zip([k for k, p in straight.model.named_parameters() if p.requires_grad], straight.ema.tensors))
    saved = {f"audio_tower.hfq_former.{k}": v for k, v in best["model"]["hfq_former"].items()}
    saved |= {f"llm.{k}": v for k, v in best["model"]["llm"].items()}
    assert all(torch.equal(saved[k], v) for k, v in averaged.items())

    # resumed past --ema-from, the average continues exactly; other EMA settings are refused
    full = tiny_trainer(recipe, tmp_path / "b", ema_decay=decay, ema_from=2)
    full.run()
    half = tiny_trainer(recipe, tmp_path / "c", ema_decay=decay, ema_from=2)
    half.run(max_steps=3)
    resumed = tiny_trainer(recipe, tmp_path / "c", ema_decay=decay, ema_from=2)
    assert resumed.step == 3 and resumed.ema is not None
    resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(full.ema.tensors, resumed.ema.tensors))
    with pytest.raises(train.RecipeError, match="without a weight average of decay 0.9"):
        tiny_trainer(recipe, tmp_path / "c", ema_decay=0.9, ema_from=2)
    assert tiny_trainer(recipe, tmp_path / "c").ema is None  # dropping the average leaves the trajectory as it is
    # a run that has not reached --ema-from may still take one
    early = tiny_trainer(recipe, tmp_path / "d")
    early.run(max_steps=1)
    assert tiny_trainer(recipe, tmp_path / "d", ema_decay=decay, ema_from=2).step == 1


def test_reading_questions_are_short_windows_with_one_right_answer_each(recipe, tmp_path):
    from fastslm.models.demo import tasks

    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0, reading_qa=6)
    batch, slots = trainer.reading_questions_for(7)
    again = trainer.reading_questions_for(7)  # seeded by the step, like batch_for
    assert torch.equal(again[0].ids, batch.ids) and again[1] == slots and len(slots) == 6
    assert trainer.reading_for(7) is None  # reading_batch stays off: the two are separate options
    tok, q = trainer.examples.tok, trainer.model.config.tokens_per_window
    slot_s = 30.0 / q
    fixed = tasks.FIRST_Q + tasks.LAST_Q + tasks.COUNT_Q + tasks.SUMMARY_Q
    kinds = set()
    for b, pairs in enumerate(slots):
        # the window is spoken within the 15 s that the real windows with questions are capped at
        assert pairs and max(s for s, _ in pairs) * slot_s <= 15.0 + slot_s
        # the window's sentences, tokenized one by one, decode without the space that joins them
        said = re.sub(r"([.?!])(?=[A-Z])", r"\1 ", tok.decode([i for _, i in pairs]))
        target = batch.targets[b].tolist()
        answer_at = next(i for i, t in enumerate(target) if t != -100)
        answer = tok.decode([t for t in target[answer_at:] if t >= 0 and t != trainer.examples.im_end])
        prompt = tok.decode(batch.ids[b, batch.speech_start[b] + q : answer_at].tolist())
        contains = re.search(r"(?:Is|Was) the word \S+ said\?", prompt)
        question = contains.group(0) if contains else next(p for p in fixed if p in prompt)
        kinds.add(question.split()[0] if contains else question)
        assert tasks.words(answer) == tasks.words(tasks.answer(question, said)), (question, said, answer)
    assert len(kinds) >= 3  # the types are drawn, not one of them always
    norm = torch.tensor(1.0)
    with torch.no_grad():
        before = float(train.reading_loss(trainer.model, batch, slots, trainer.slot_head.silence, norm))
    for _ in range(3):
        trainer.train_step(trainer.batch_for(0), None, (batch, slots))
    with torch.no_grad():
        after = float(train.reading_loss(trainer.model, batch, slots, trainer.slot_head.silence, norm))
    assert after < before - 0.1
    # runs started before question reading existed keep their trajectory key
    assert "reading_qa" not in train.TrainOptions().trajectory_key()
    assert train.TrainOptions(reading_qa=4).trajectory_key()["reading_qa"] == 4


def test_training_counts_its_cpu_seconds_over_resumes(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0)
    trainer.run(max_steps=2)
    spent = torch.load(tmp_path / train.STATE_FILE, weights_only=True)["cpu_s"]
    assert spent > 0.0
    resumed = tiny_trainer(recipe, tmp_path, augment_prob=0.0)
    assert resumed.step == 2 and resumed.cpu_seconds >= spent
    resumed.run()
    assert torch.load(tmp_path / train.STATE_FILE, weights_only=True)["cpu_s"] > spent


def test_selection_evaluator_scores_every_question_type(recipe, corpus, tmp_path):
    from fastslm.calibration.evaluation import EvalItem
    from fastslm.models.demo.recipe import SelectionEvaluator

    items = [EvalItem(u.id, u.text, u.path) for u in recipe["utts"][:3]]
    evaluator = SelectionEvaluator(items, recipe["work"] / "tokenizer.json", tmp_path / "eval.npz", tiny_encoder())
    model = train.new_model(tiny_demo_config(-(-recipe["tokenizer"].vocab_size // 64) * 64), 0, tiny_encoder())
    result = evaluator(model.eval())
    assert set(result["qa_by_type"]) == {"first", "last", "count", "summary", "contains"}
    assert result["wer"] >= 0.0 and 0.0 <= result["qa"] <= 100.0
    # five questions per item, one of each type: the overall accuracy is the mean of the types'
    assert result["qa"] == pytest.approx(sum(result["qa_by_type"].values()) / 5, abs=0.1)
    # the encoder's output is computed once and read back from the cache
    again = SelectionEvaluator(items, recipe["work"] / "tokenizer.json", tmp_path / "eval.npz", None)
    assert [f.shape for f in again.features] == [f.shape for f in evaluator.features]
    # with a tuned top the cache holds its input and the model runs it: the same transcripts while it is untrained
    tuned = SelectionEvaluator(items, recipe["work"] / "tokenizer.json", tmp_path / "eval.npz", tiny_encoder(),
                               tuned_top_blocks=1)
    assert not np.allclose(tuned.features[0], evaluator.features[0])
    assert tuned(model.eval()) == result


def test_eval_stage_says_at_once_when_the_real_recording_is_missing(tmp_path, monkeypatch):
    from fastslm.calibration.evaluation import EvalSetError
    from fastslm.models.demo import recipe as recipe_module

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never read: the check comes first
    monkeypatch.setenv("FASTSLM_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EvalSetError, match="FASTSLM_SHARED_DATA"):
        recipe_module.stage_eval(model, tmp_path / "corpus", None, tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()


def test_question_levers_wait_for_qa_from_then_ramp_in(recipe, tmp_path):
    o = train.TrainOptions(qa_from=1000)
    shares = [train.question_share(s, o) for s in (0, 999, 1000, 1249, 1499, 5000)]
    assert shares == [0.0, 0.0, 1 / train.QA_RAMP_STEPS, 250 / train.QA_RAMP_STEPS, 1.0, 1.0]
    assert train.question_share(0, train.TrainOptions()) == 1.0  # qa_from 0: from the start, no ramp
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0, reading_qa=2, qa_weight=5.0, qa_from=3, qa_prob=1.0)
    assert trainer.reading_questions_for(2) is None and trainer.reading_questions_for(3) is not None

    def question_weights(step: int) -> set[float]:  # loss weights of the audio batch's question answers
        batch = trainer.batch_for(step)  # with qa_prob 1, every window that has questions trains on one
        rows = [b for b, w in enumerate(batch.windows) if len(trainer.windows[w]["examples"]) > 1]
        return {round(float(v), 4) for b in rows for v in batch.weights[b] if v > 0}

    assert question_weights(2) == {1.0}
    assert question_weights(3) == {round(1.0 + 4.0 / train.QA_RAMP_STEPS, 4)}
    assert "qa_from" not in train.TrainOptions().trajectory_key()


def test_questions_reason_first_from_qa_think_from(recipe, tmp_path):
    trainer = tiny_trainer(recipe, tmp_path, augment_prob=0.0, reading_qa=3, qa_weight=4.0, qa_prob=1.0,
                           qa_think_from=3)
    tok = trainer.examples.tok
    think_open, think_close = tok.think_ids

    def question_rows(batch, windows=True):
        rows = [b for b, w in enumerate(batch.windows) if len(trainer.windows[w]["examples"]) > 1] if windows \
            else range(len(batch.ids))
        assert rows
        return rows

    for step in (2, 3):
        batch = trainer.batch_for(step)
        questions, _ = trainer.reading_questions_for(step)
        for b, windows in [(b, True) for b in question_rows(batch)] + [(b, False) for b in question_rows(questions, False)]:
            source = batch if windows else questions
            target = source.targets[b].tolist()
            reply_at = next(i for i, t in enumerate(target) if t != -100)
            reply = [t for t in target[reply_at:] if t >= 0][:-1]  # without <|im_end|>
            weights = source.weights[b, reply_at : reply_at + len(reply) + 1].tolist()
            if step < 3:  # before qa_think_from: the answer alone, as before the option existed
                assert think_open not in reply and len(set(weights)) == 1
                continue
            answer, heard = tok.decode_answer(reply)  # the runtime's own split of the reply
            assert reply[0] == think_open and think_close in reply and heard and answer
            if windows:  # the window's transcript, its ASR example
                assert heard == trainer.windows[batch.windows[b]]["examples"][0]["answer"].strip()
            # the thinking is transcript (weight 1), the answer after it a question's (qa_weight)
            n_answer = len(tok.encode(answer)) + 1  # and <|im_end|>
            assert set(weights[:-n_answer]) == {1.0} and set(weights[-n_answer:]) == {4.0}
            assert reply.index(think_close) < len(reply) - n_answer + 1


def test_qa_think_from_may_be_set_on_a_run_that_has_not_reached_it(recipe, tmp_path):
    options = dict(augment_prob=0.0, reading_qa=2, qa_prob=1.0, steps=5)
    straight = tiny_trainer(recipe, tmp_path / "a", qa_think_from=3, **options)
    assert straight.run()["finished"]
    tiny_trainer(recipe, tmp_path / "b", **options).run(max_steps=3)  # without it, to step 3
    resumed = tiny_trainer(recipe, tmp_path / "b", qa_think_from=3, **options)
    assert resumed.step == 3 and resumed.run()["finished"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run as one with the option from the start
    # once the run has passed the step, the option is part of it
    with pytest.raises(train.RecipeError):
        tiny_trainer(recipe, tmp_path / "b", **options)
    with pytest.raises(train.RecipeError):
        tiny_trainer(recipe, tmp_path / "b", qa_think_from=4, **options)
    tiny_trainer(recipe, tmp_path / "c", **options).run(max_steps=4)
    with pytest.raises(train.RecipeError):  # a step already behind the run
        tiny_trainer(recipe, tmp_path / "c", qa_think_from=3, **options)
    assert "qa_think_from" not in train.TrainOptions().trajectory_key()


def test_summary_scratch_lists_the_words_a_summary_picks_from_its_step(recipe, tmp_path, capsys):
    assert tasks.content_words("The cat and the dog saw the cat, then a dog.") == ["cat", "dog", "saw"]
    assert tasks.content_words("It is what it is.") == []
    o = train.TrainOptions(qa_think_from=0, summary_scratch_from=3)
    text = "Add four cups of flour and five eggs to the bowl."
    assert train.thinking_for("Give a three word summary.", text, 2, o) == text
    assert train.thinking_for("Give a three word summary.", text, 3, o) == f"{text}\nadd four cups flour five eggs bowl"
    assert train.thinking_for("What is the last word?", text, 3, o) == text  # other questions: the transcript
    # in training batches: every summary's thinking ends with its word line from the step on
    options = dict(augment_prob=0.0, reading_qa=6, qa_prob=1.0, steps=5, qa_think_from=0,
                   reading_qa_types_from=((0, (("summary", 1.0), ("contains", 0.0), ("count", 0.0),
                                               ("first", 0.0), ("last", 0.0))),))
    tok = recipe["tokenizer"]
    trainer = tiny_trainer(recipe, tmp_path / "s", summary_scratch_from=3, **options)
    for step, scratch in ((2, False), (3, True)):
        batch = trainer.reading_questions_for(step)[0]
        for b in range(batch.targets.shape[0]):
            reply = [t for t in batch.targets[b].tolist() if t >= 0][:-1]
            answer, heard = tok.decode_answer(reply)
            lines = heard.strip().splitlines()
            assert len(lines) == (2 if scratch else 1)
            if scratch:
                assert lines[1].split() == tasks.content_words(lines[0])
                assert tasks.words(answer) == tasks.words(tasks.summary(lines[0]))
    # a run that has not reached the step may take the option: the same weights as one given it from step 0
    straight = tiny_trainer(recipe, tmp_path / "a", summary_scratch_from=3, **options)
    assert straight.run()["finished"]
    tiny_trainer(recipe, tmp_path / "b", **options).run(max_steps=3)
    resumed = tiny_trainer(recipe, tmp_path / "b", summary_scratch_from=3, **options)
    assert resumed.step == 3 and resumed.run()["finished"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(train.RecipeError):  # once passed, it is part of the run
        tiny_trainer(recipe, tmp_path / "b", **options)
    assert "summary_scratch_from" not in train.TrainOptions().trajectory_key()
    from fastslm.models.demo.recipe import main

    with pytest.raises(SystemExit) as exit_info:  # a negative step: one error line, nothing written
        main(["--work", str(tmp_path / "w"), "--stage", "train", "--summary-scratch-from", "-1"])
    assert exit_info.value.code != 0 and "--summary-scratch-from must be a step (>= 0); got -1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_lr_restart_repeats_the_shorter_schedule_to_the_bit_then_climbs_to_its_peak(recipe, tmp_path, capsys):
    short = train.TrainOptions(warmup_steps=500, steps=8000)
    longer = train.TrainOptions(warmup_steps=500, steps=12000, lr_restarts=((8000, 5e-4),))
    # every step before the restart: the 8,000-step run's rate, exactly (its weights are the same)
    assert all(train.learning_rate(s, 8000, short) == train.learning_rate(s, 12000, longer) for s in range(8000))
    floor = longer.lr * longer.min_lr_ratio
    rates = [train.learning_rate(s, 12000, longer) for s in range(8000, 12001)]
    assert rates[0] == pytest.approx(floor + (5e-4 - floor) / train.RESTART_WARMUP_STEPS)
    assert max(rates) == pytest.approx(5e-4) and rates.index(max(rates)) == train.RESTART_WARMUP_STEPS - 1
    tail = rates[train.RESTART_WARMUP_STEPS - 1:]
    assert all(a >= b for a, b in zip(tail, tail[1:])) and tail[-1] == pytest.approx(floor)
    # two restarts: the first cycle ends where the second begins
    two = train.TrainOptions(warmup_steps=10, steps=1000, lr_restarts=((600, 4e-4), (300, 8e-4)))
    assert two.lr_restarts == ((300, 8e-4), (600, 4e-4))
    assert [train.learning_rate(s, 1000, two) for s in (299, 300, 499, 599, 600, 799)] == pytest.approx(
        [floor, floor + (8e-4 - floor) / train.RESTART_WARMUP_STEPS, 8e-4, floor, floor + (4e-4 - floor) / 200, 4e-4],
        rel=0.01)
    for bad in (dict(lr_restarts=((5, 1e-4),)), dict(lr_restarts=((9000, 1e-4),)), dict(lr_restarts=((700, 0.0),))):
        with pytest.raises(ValueError):
            train.TrainOptions(warmup_steps=10, steps=8000, **bad)
    # a run that has not reached the restart may take it: bit-identical to one given it from step 0
    options = dict(augment_prob=0.0, steps=6)
    straight = tiny_trainer(recipe, tmp_path / "a", lr_restarts=((4, 2e-3),), **options)
    assert straight.run()["finished"]
    tiny_trainer(recipe, tmp_path / "b", **{**options, "steps": 4}).run()
    resumed = tiny_trainer(recipe, tmp_path / "b", lr_restarts=((4, 2e-3),), **options)
    assert resumed.step == 4 and resumed.run()["finished"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(train.RecipeError):  # a restart the run has passed is part of it
        tiny_trainer(recipe, tmp_path / "b", lr_restarts=((4, 1e-3),), **options)
    assert "lr_restarts" not in train.TrainOptions().trajectory_key()
    # the recipe's flag: a malformed one as argparse's one usage line, one past --steps as one error line
    from fastslm.models.demo.recipe import main

    for bad in ("8000", "x:1e-4", "8000:0", "8000:-1e-4", "8000:inf", "8000:nan"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--work", str(tmp_path / "w"), "--stage", "train", "--lr-restart", bad])
        assert exit_info.value.code == 2 and "--lr-restart" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "w"), "--stage", "train", "--steps", "8000", "--lr-restart", "8000:1e-4"])
    assert exit_info.value.code != 0 and "--lr-restart needs a step before --steps 8000" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_reading_question_types_follow_their_weights_from_their_step(recipe, tmp_path, capsys):
    only_summary = (("contains", 0.0), ("count", 0.0), ("first", 0.0), ("last", 0.0))
    options = dict(augment_prob=0.0, reading_qa=6, qa_prob=1.0, steps=8)
    tok = recipe["tokenizer"]

    def types_at(trainer, step):
        batch = trainer.reading_questions_for(step)[0]
        texts = [tok.decode([int(i) for i in ids]) for ids in batch.ids]
        return [next(t for t, phrasings in (("summary", tasks.SUMMARY_Q), ("count", tasks.COUNT_Q),
                                            ("first", tasks.FIRST_Q), ("last", tasks.LAST_Q))
                     if any(p in text for p in phrasings)) if "Is the word" not in text and "Was the word" not in text
                else "contains" for text in texts]

    weighted = tiny_trainer(recipe, tmp_path / "w", reading_qa_types_from=((3, only_summary),), **options)
    plain = tiny_trainer(recipe, tmp_path / "p", **options)
    assert [types_at(weighted, s) for s in range(3)] == [types_at(plain, s) for s in range(3)]  # before its step
    assert len({t for s in range(3) for t in types_at(plain, s)}) >= 3
    assert all(types_at(weighted, s) == ["summary"] * 6 for s in range(3, 8))
    # weights, not a filter: summary 4 against 1 for the rest is drawn about half the time
    half = tiny_trainer(recipe, tmp_path / "h", reading_qa_types_from=((0, (("summary", 4.0),)),), **options)
    drawn = [t for s in range(8) for t in types_at(half, s)]
    assert 0.3 <= drawn.count("summary") / len(drawn) <= 0.75 and len(set(drawn)) >= 3
    assert "reading_qa_types_from" not in train.TrainOptions().trajectory_key()
    # a checkpoint written with weights resumes with them (the schedule survives torch.load's weights_only)
    tiny_trainer(recipe, tmp_path / "r", reading_qa_types_from=((1, only_summary),), **{**options, "steps": 2}).run()
    assert tiny_trainer(recipe, tmp_path / "r", reading_qa_types_from=((1, only_summary),), **options).step == 2
    with pytest.raises(train.RecipeError):  # and only with them, once it has passed their step
        tiny_trainer(recipe, tmp_path / "r", **options)
    with pytest.raises(ValueError):
        train.TrainOptions(reading_qa_types_from=((0, (("colour", 1.0),)),))
    with pytest.raises(ValueError):
        train.TrainOptions(reading_qa_types_from=((0, tuple((t, 0.0) for t in tasks.QUESTION_TYPES)),))
    from fastslm.models.demo.recipe import main

    for bad in ("8000", "8000:colour=1", "8000:summary", "8000:summary=-1", "8000:summary=inf", "x:summary=2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--work", str(tmp_path / "x"), "--stage", "train", "--reading-qa-types-from", bad])
        assert exit_info.value.code == 2 and "--reading-qa-types-from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_reading_questions_follow_their_schedule_and_a_run_may_take_a_later_entry(recipe, tmp_path, capsys):
    o = train.TrainOptions(reading_qa=8, reading_qa_from=((300, 24), (100, 16)))
    assert o.reading_qa_from == ((100, 16), (300, 24))  # kept in step order
    assert [train.reading_questions_at(s, o) for s in (0, 99, 100, 299, 300, 9000)] == [8, 8, 16, 16, 24, 24]
    options = dict(augment_prob=0.0, reading_qa=2, qa_prob=1.0, steps=5)
    trainer = tiny_trainer(recipe, tmp_path / "n", reading_qa_from=((3, 5),), **options)
    assert len(trainer.reading_questions_for(2)[1]) == 2 and len(trainer.reading_questions_for(3)[1]) == 5
    # the first draws of a step are the same whatever the count (seeded by the step)
    first = [t[t != -100] for t in (trainer.reading_questions_for(3)[0].targets[0],
                                    tiny_trainer(recipe, tmp_path / "m", **options).reading_questions_for(3)[0].targets[0])]
    assert torch.equal(*first) and len(first[0]) > 1
    straight = tiny_trainer(recipe, tmp_path / "a", reading_qa_from=((3, 5),), **options)
    assert straight.run()["finished"]
    tiny_trainer(recipe, tmp_path / "b", **options).run(max_steps=3)
    resumed = tiny_trainer(recipe, tmp_path / "b", reading_qa_from=((3, 5),), **options)
    assert resumed.step == 3 and resumed.run()["finished"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(train.RecipeError):  # an entry the run has passed is part of it
        tiny_trainer(recipe, tmp_path / "b", reading_qa_from=((3, 6),), **options)
    assert "reading_qa_from" not in train.TrainOptions().trajectory_key()
    # the recipe's flag, and a malformed one as argparse's one usage line
    from fastslm.models.demo.recipe import main

    for bad in ("4600", "x:3", "4600:-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--work", str(tmp_path / "w"), "--stage", "train", "--reading-qa-from", bad])
        assert exit_info.value.code == 2 and "--reading-qa-from" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bundle_stage_exports_fp32_and_the_calibrated_int8_default(tmp_path, monkeypatch):
    import subprocess

    from fastslm.models.demo import recipe

    corpus, paths = tmp_path / "corpus", recipe.Paths(tmp_path / "work")
    (corpus / "audio" / "calib").mkdir(parents=True)
    with pytest.raises(train.RecipeError, match="holds no recordings"):
        recipe.stage_bundle(paths.model, corpus, paths)
    sf.write(corpus / "audio" / "calib" / "calib-000000.flac", np.zeros(1600, np.float32), SAMPLE_RATE)
    with pytest.raises(train.RecipeError, match="gate.jsonl is missing"):
        recipe.stage_bundle(paths.model, corpus, paths)
    (corpus / "gate.jsonl").write_text("")
    calls, fail = [], set()

    def fake_run(cmd):
        calls.append(cmd)
        target, out = cmd[cmd.index("--target") + 1], Path(cmd[cmd.index("--out") + 1])
        if target in fail:
            return subprocess.CompletedProcess(cmd, 1)
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    fail.add("onnx-int8")
    with pytest.raises(train.RecipeError, match="--target onnx-int8 failed"):
        recipe.stage_bundle(paths.model, corpus, paths)
    fail.clear()
    recipe.stage_bundle(paths.model, corpus, paths)  # the fp32 bundle is done: only INT8 runs again
    targets = [c[c.index("--target") + 1] for c in calls]
    assert targets == ["onnx", "onnx-int8", "onnx-int8"]
    assert all(c[1:3] == ["-m", "fastslm.export.cli"] and c[c.index("--model") + 1] == str(paths.model)
               for c in calls)
    assert "--calibration-audio" not in calls[0] and calls[2][calls[2].index("--calibration-audio") + 1] == str(
        corpus / "audio" / "calib")
    # INT8 gates on the corpus's gate split (every utterance of it) at the beam width users decode with
    flag = lambda name: calls[2][calls[2].index(name) + 1]  # noqa: E731
    assert (flag("--eval-corpus"), flag("--wer-items"), flag("--gate-beam")) == (str(corpus), "200", "4")
    assert "--eval-corpus" not in calls[0]
    recipe.stage_bundle(paths.model, corpus, paths)
    assert len(calls) == 3  # both bundles done: nothing runs


def test_eval_bundle_stage_scores_the_int8_loss_over_every_split_and_resumes(tmp_path, monkeypatch):
    from fastslm.calibration.evaluation import EvalItem
    from fastslm.models.demo import evaluate, recipe
    from fastslm.runtime import generate

    paths = recipe.Paths(tmp_path / "work")
    with pytest.raises(train.RecipeError, match="not a bundle yet"):
        recipe.stage_eval_bundle(tmp_path, paths, tmp_path / "report.json")
    for precision in ("fp32", "int8"):
        paths.bundle(precision).mkdir(parents=True)
        (paths.bundle(precision) / "manifest.json").write_text("{}")
    refs = {"eval_seen": ["the cat sat down", "red hat"], "eval_unseen": ["green apples"], "jfk": ["ask not"]}
    # INT8 drops one word of eval_seen's first sentence and one of jfk: 2 errors in 10 words
    hyps = {"fp32": refs, "int8": {**refs, "eval_seen": ["the cat sat", "red hat"], "jfk": ["ask"]}}
    calls = []
    monkeypatch.setattr(evaluate, "load_split", lambda split, corpus, limit=None: [
        EvalItem(f"{split}-{i}", t, tmp_path / "x.flac") for i, t in enumerate(refs[split])])
    monkeypatch.setattr(generate.Pipeline, "load", staticmethod(lambda path, *a, **k: path.name.split("-")[1]))

    def fake_split(pipe, split, corpus, limit=None, show=0, progress=True, beam_size=1):
        calls.append((pipe, split) if beam_size == 1 else (pipe, split, beam_size))
        if split == "qa":
            return {"split": "qa", "n": 5, "qa": 60.0 + (beam_size - 1), "qa_by_type": {"count": 40.0}, "seconds": 0.1}
        return {"split": split, "n": len(refs[split]), "wer": 0.0, "seconds": 0.1, "hyps": hyps[pipe][split]}

    baselines = []

    def fake_baseline(split, corpus, limit=None, cache=None, threads=2, beam_size=1):
        baselines.append((split, beam_size))
        return {"wer": 1.5}

    monkeypatch.setattr(evaluate, "evaluate_split", fake_split)
    monkeypatch.setattr(evaluate, "faster_whisper_wer", fake_baseline)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"fp32": {"eval_seen": fake_split("fp32", "eval_seen", None)}}))
    calls.clear()
    done = recipe.stage_eval_bundle(tmp_path, paths, report)
    assert calls == [("fp32", "eval_unseen"), ("fp32", "jfk"), ("int8", "eval_seen"), ("int8", "eval_unseen"),
                     ("int8", "jfk"), ("int8", "qa"), ("int8", "eval_seen", 4), ("int8", "eval_unseen", 4),
                     ("int8", "jfk", 4), ("int8", "qa", 4), ("fp32", "eval_seen", 4), ("fp32", "eval_unseen", 4),
                     ("fp32", "jfk", 4)]
    # the beam-search rows carry faster-whisper's WER at the same width; greedy rows are unchanged
    assert baselines == [("eval_seen", 4), ("eval_unseen", 4), ("jfk", 4)] * 2
    assert done["int8-beam4"]["jfk"]["faster_whisper_wer"] == 1.5 and done["int8-beam4"]["qa"]["qa"] == 63.0
    # the INT8 loss at both decodings (the fake gives each width the same hypotheses)
    for key in ("all", "all-beam4"):
        assert done[key] == {"n": 4, "splits": ["eval_seen", "eval_unseen", "jfk"], "fp32": 0.0, "int8": 20.0,
                             "int8_minus_fp32": 20.0}
    assert json.loads(report.read_text())["int8"]["qa"]["qa"] == 60.0
    calls.clear()
    recipe.stage_eval_bundle(tmp_path, paths, report)
    assert calls == []  # every split of every row is in the report: a rerun scores nothing again


def test_checkpoints_are_selected_on_the_select_split_and_old_runs_keep_their_set(tmp_path, monkeypatch):
    from fastslm.calibration.evaluation import EvalItem
    from fastslm.models.demo import recipe

    def write_split(name: str, n: int) -> None:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"id": f"{name}-{i:06d}", "text": f"line {i}", "voice": "v", "params": {}, "seconds": 1.0,
             "path": f"audio/{name}/{i}.flac"}) + "\n" for i in range(n)))

    write_split("eval_seen", 50)
    cache = tmp_path / "train" / recipe.SELECTION_CACHE
    cache.parent.mkdir()
    ids = lambda items: [it.id for it in items]  # noqa: E731
    # a corpus made before the select split: the last 40 eval_seen utterances, as before
    assert ids(recipe.selection_items(tmp_path, cache)) == [f"eval_seen-{i:06d}" for i in range(10, 50)]
    write_split("select", 40)
    assert ids(recipe.selection_items(tmp_path, cache)) == [f"select-{i:06d}" for i in range(40)]
    # a run that began on eval_seen keeps it after the split is added: its best score stays comparable
    np.savez(cache, ids=np.array([f"eval_seen-{i:06d}" for i in range(10, 50)]))
    assert ids(recipe.selection_items(tmp_path, cache))[0] == "eval_seen-000010"
    paths = recipe.Paths(tmp_path)
    selected = recipe.selection_ids(paths)
    assert len(selected) == 40 and recipe.selection_ids(recipe.Paths(tmp_path / "none")) == frozenset()

    # the eval stages add the score over the utterances that did not pick the checkpoint
    items = [EvalItem(f"eval_seen-{i:06d}", t, tmp_path / "x.flac")
             for i, t in enumerate(["red hat", "blue cat", "one two three four"])]
    monkeypatch.setattr(evaluate, "load_split", lambda split, corpus, limit=None: items)
    picked = frozenset({"eval_seen-000002"})
    r = {"wer": 0.0, "hyps": ["red hat", "blue dog", "one two"]}  # 3 errors in 8 words, 1 in the first 4
    assert recipe.add_unselected(r, "eval_seen", tmp_path, None, picked).startswith("WER 25.00% on the 2 utterances")
    assert r["unselected"] == {"n": 2, "wer": 25.0}
    questions = evaluate.questions_for_items(items)
    answers = [[items[i].id, q, expected if i == 0 else "wrong"] for i, q, expected in questions]
    qa = {"qa": 0.0, "answers": answers}
    assert "QA 50.00% on the 10 questions" in recipe.add_unselected(qa, "qa", tmp_path, None, picked)
    assert qa["unselected"]["n"] == 10 and qa["unselected"]["qa"] == 50.0
    assert recipe.add_unselected(dict(r), "eval_seen", tmp_path, None, frozenset()) == ""


def test_the_eval_command_scores_the_splits_decoding_is_tuned_on(tmp_path, monkeypatch, capsys):
    """gate and select are held out from every reported set: the eval command reads them like eval_seen."""
    for split in ("gate", "select"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(
            {"id": f"{split}-000000", "text": "red hat and blue cat", "voice": "v", "params": {}, "seconds": 1.0,
             "path": f"audio/{split}/0.flac"}) + "\n")
    monkeypatch.setattr(evaluate, "faster_whisper_transcripts",
                        lambda items, threads=2, progress=False, beam_size=1: ["red hat and a blue cat"])
    for split in ("gate", "select"):
        evaluate.main(["--split", split, "--corpus", str(tmp_path), "--faster-whisper", "--beam-size", "8"])
        assert capsys.readouterr().out.startswith(f"{split}: WER 20.00% on 1 utterance(s)")


def test_faster_whisper_baseline_is_cached_per_beam_width(tmp_path, monkeypatch):
    from fastslm.calibration.evaluation import EvalItem
    from fastslm.models.demo import evaluate

    monkeypatch.setattr(evaluate, "load_split", lambda split, corpus, limit=None: [
        EvalItem("jfk-0", "ask not what your country", tmp_path / "x.flac")])
    widths = []

    def fake_transcripts(items, threads=2, progress=False, beam_size=1):
        widths.append(beam_size)
        return ["ask not what your country" if beam_size > 1 else "ask what your country"]

    monkeypatch.setattr(evaluate, "faster_whisper_transcripts", fake_transcripts)
    cache = tmp_path / "fw.json"
    assert evaluate.faster_whisper_wer("jfk", tmp_path, None, cache)["wer"] == 20.0
    assert evaluate.faster_whisper_wer("jfk", tmp_path, None, cache, beam_size=4)["wer"] == 0.0
    assert evaluate.faster_whisper_wer("jfk", tmp_path, None, cache, beam_size=4)["wer"] == 0.0
    assert evaluate.faster_whisper_wer("jfk", tmp_path, None, cache)["wer"] == 20.0
    assert widths == [1, 4]  # each width ran once; the greedy key is the one older caches hold
    assert sorted(json.loads(cache.read_text())) == ["jfk:1:jfk-0:jfk-0", "jfk:1:jfk-0:jfk-0:beam4"]
