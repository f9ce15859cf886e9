"""The composed FastSLM: model folder round trip, the published checkpoint's key layout,
fastslm-convert, and the shared generate loop on the PyTorch reference."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from fastslm.models.checkpoint import LoRASettings, fastslm_tokenizer, load_reference_checkpoint
from fastslm.models.convert import app as convert_app
from fastslm.models.fastslm import FastSLM
from fastslm.models.tiny import build_tiny_model
from fastslm.models.torch_backend import TorchBackend
from fastslm.runtime.audio import audio_to_windows, load_audio
from fastslm.runtime.errors import ModelFileError
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.prompt import CHAT_TOKENS, SPECIAL_TOKENS
from fastslm.runtime.sampling import SamplingOptions
from fastslm.runtime.tokenizer import Tokenizer

LORA = LoRASettings(alpha=64.0, r=4)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model(folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return FastSLM.from_pretrained(tiny_dir)


def random_mel(windows: int, n_mels: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(windows, n_mels, 3000, generator=g) * 0.5


def test_model_folder_round_trip(tmp_path, tiny, tiny_dir):
    tiny.save_pretrained(tmp_path, tokenizer_json=tiny_dir / "tokenizer.json")
    again = FastSLM.from_pretrained(tmp_path)
    mel = random_mel(2)
    with torch.inference_mode():
        diff = (again.encode_audio(mel) - tiny.encode_audio(mel)).abs().max().item()
    assert diff == 0.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "fastslm-model" and config["hfq_former"]["n_queries"] == 5
    # every file gets a new file's permissions (safetensors alone would make the weights owner-only)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {p.name: oct(0o666 & ~umask) for p in tmp_path.iterdir()}


def test_model_folder_in_the_old_key_layout_loads(tmp_path, tiny, tiny_dir):
    """Folders written before the audio tower's parts had one name each (`encoder.whisper.*`,
    `encoder.adapter.*`) load under today's names, whole or as parts; one weight under both names is refused."""
    from safetensors.torch import load_file

    from fastslm.models.weights import SafetensorsFolder, current_key

    tiny.save_pretrained(tmp_path, tokenizer_json=tiny_dir / "tokenizer.json")
    today = load_file(tmp_path / "model.safetensors")
    old_names = {"audio_tower.whisper.": "encoder.whisper.", "audio_tower.hfq_former.": "encoder.adapter."}
    old = {}
    for name, tensor in today.items():
        prefix = next((p for p in old_names if name.startswith(p)), "")
        old[old_names.get(prefix, "") + name[len(prefix) :]] = tensor
    assert sum(k.startswith("encoder.adapter.") for k in old) > 10 and not any(k.startswith("audio_tower.") for k in old)
    save_file(old, str(tmp_path / "model.safetensors"))

    assert {current_key(k) for k in old} == set(today) and SafetensorsFolder(tmp_path).keys() == [current_key(k) for k in old]
    again = FastSLM.from_pretrained(tmp_path)
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    only_audio = FastSLM.from_pretrained(tmp_path, parts=("audio_tower",))
    mel = random_mel(2)
    with torch.inference_mode():
        assert torch.equal(only_audio.encode_audio(mel), tiny.encode_audio(mel))

    # A folder holding one weight under both names is refused, not read half from each.
    both = {**old, "audio_tower.whisper.conv1.weight": old["encoder.whisper.conv1.weight"].clone()}
    save_file(both, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError, match="holds audio_tower.whisper.conv1.weight twice"):
        FastSLM.from_pretrained(tmp_path)


def test_audio_tower_shapes(tiny):
    with torch.inference_mode():
        tokens = tiny.encode_audio(random_mel(3))
    assert tokens.shape == (3, 5, tiny.config.qwen3.hidden_size)


def test_windows_are_encoded_independently(tiny):
    # Batching windows must not mix them: each row equals encoding that window alone.
    mel = random_mel(3)
    with torch.inference_mode():
        batched = tiny.encode_audio(mel)
        alone = torch.cat([tiny.encode_audio(mel[i : i + 1]) for i in range(3)])
    assert (batched - alone).abs().max().item() < 1e-5


def test_model_folder_errors(tmp_path, tiny_dir):
    with pytest.raises(ModelFileError, match="has no config.json"):
        FastSLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ModelFileError, match="has no model.safetensors"):
        FastSLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="damaged") as err:
        FastSLM.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


# ---- the published checkpoint's key layout ---------------------------------------------------


def reference_state_dict(model: FastSLM, seed: int = 3) -> tuple[dict, dict]:
    """Our model's weights under the reference repo's names, with random LoRA pairs added.

    Returns (reference state dict, the merged weights we expect to load under our names).
    """
    g = torch.Generator().manual_seed(seed)
    reference, expected = {}, {}
    for name, tensor in model.state_dict().items():
        expected[name] = tensor.clone()
        if name.startswith("audio_tower.whisper."):
            reference["encoder.whisper." + name.removeprefix("audio_tower.whisper.")] = tensor.clone()
        elif name.startswith("audio_tower.hfq_former."):
            reference["encoder." + name.removeprefix("audio_tower.hfq_former.")] = tensor.clone()
        elif name.startswith("llm."):
            peft = "llm.base_model.model." + name.removeprefix("llm.")
            module = name.rsplit(".", 2)[-2]
            if module in LORA_TARGETS and name.endswith(".weight"):
                out_dim, in_dim = tensor.shape
                a = torch.randn(LORA.r, in_dim, generator=g) * 0.1
                b = torch.randn(out_dim, LORA.r, generator=g) * 0.1
                stem = peft.removesuffix(".weight")
                reference[f"{stem}.base_layer.weight"] = tensor.clone()
                reference[f"{stem}.lora_A.default.weight"] = a
                reference[f"{stem}.lora_B.default.weight"] = b
                expected[name] = tensor + LORA.scale * b @ a
            else:
                reference[peft] = tensor.clone()
    # PEFT state dicts carry the tied head as its own key.
    reference["llm.base_model.model.lm_head.weight"] = model.state_dict()["llm.model.embed_tokens.weight"].clone()
    return reference, expected


def write_qwen_dir(folder, model: FastSLM, with_weights: bool = False) -> None:
    from transformers import Qwen3Config

    q = model.config.qwen3
    Qwen3Config(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        num_key_value_heads=q.num_kv_heads,
        head_dim=q.head_dim,
        rope_theta=q.rope_theta,
        rms_norm_eps=q.rms_norm_eps,
        tie_word_embeddings=q.tie_word_embeddings,
        max_position_embeddings=q.max_position_embeddings,
    ).to_json_file(folder / "config.json")
    qwen_style_tokenizer().save(str(folder / "tokenizer.json"))
    if with_weights:
        save_file({k: v.contiguous() for k, v in model.llm.state_dict().items()}, str(folder / "model.safetensors"))


def qwen_style_tokenizer() -> HFTokenizer:
    """A byte-level BPE with Qwen's chat tokens but without FastSLM's special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(CHAT_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["ask not what your country can do for you"] * 10, trainer)
    return tok


def assert_same_model(loaded: FastSLM, expected_state: dict, like: FastSLM) -> None:
    reference = FastSLM(like.config)
    reference.load_state_dict(expected_state)
    reference.eval()
    mel = random_mel(2)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.inference_mode():
        audio_diff = (loaded.encode_audio(mel) - reference.encode_audio(mel)).abs().max().item()
        logit_diff = (loaded.llm(input_ids=ids).logits - reference.llm(input_ids=ids).logits).abs().max().item()
    assert audio_diff <= 1e-5, f"speech tokens differ by {audio_diff}"
    assert logit_diff <= 1e-4, f"logits differ by {logit_diff}"


def test_full_reference_checkpoint_loads_with_lora_merged(tmp_path, tiny):
    reference, expected = reference_state_dict(tiny)
    torch.save(reference, tmp_path / "Stage3_FastSLM.pt")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    write_qwen_dir(qwen, tiny)
    loaded = load_reference_checkpoint(tmp_path / "Stage3_FastSLM.pt", qwen, lora=LORA)
    assert loaded.config.hfq_former == tiny.config.hfq_former
    assert loaded.config.whisper.n_layers == tiny.config.whisper.n_layers
    assert_same_model(loaded, expected, tiny)


def test_hfq_former_and_lora_only_checkpoint_with_separate_whisper_and_qwen(tmp_path, tiny):
    reference, expected = reference_state_dict(tiny)
    hfq_former_and_lora = {
        k: v for k, v in reference.items() if not k.startswith("encoder.whisper.") and (".lora_" in k or not k.startswith("llm."))
    }
    torch.save(hfq_former_and_lora, tmp_path / "hfq_former_lora.pt")
    whisper_dims = tiny.config.whisper
    openai_checkpoint = {
        "dims": {
            "n_mels": whisper_dims.n_mels,
            "n_audio_ctx": whisper_dims.n_ctx,
            "n_audio_state": whisper_dims.width,
            "n_audio_head": whisper_dims.n_heads,
            "n_audio_layer": whisper_dims.n_layers,
            "n_vocab": 100,
            "n_text_ctx": 16,
            "n_text_state": whisper_dims.width,
            "n_text_head": whisper_dims.n_heads,
            "n_text_layer": 1,
        },
        "model_state_dict": {
            "encoder." + k.removeprefix("audio_tower.whisper."): v.clone()
            for k, v in tiny.state_dict().items()
            if k.startswith("audio_tower.whisper.")
        },
    }
    torch.save(openai_checkpoint, tmp_path / "large-v3.pt")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    write_qwen_dir(qwen, tiny, with_weights=True)
    with pytest.raises(ModelFileError, match="pass --whisper"):
        load_reference_checkpoint(tmp_path / "hfq_former_lora.pt", qwen, lora=LORA)
    loaded = load_reference_checkpoint(tmp_path / "hfq_former_lora.pt", qwen, whisper=tmp_path / "large-v3.pt", lora=LORA)
    assert_same_model(loaded, expected, tiny)


def test_legacy_resampler_names_load(tmp_path, tiny):
    reference, expected = reference_state_dict(tiny)
    legacy = {k.replace("encoder.compressor1.", "encoder.resampler1."): v for k, v in reference.items()}
    assert any(k.startswith("encoder.resampler1.") for k in legacy)
    torch.save(legacy, tmp_path / "old.pt")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    write_qwen_dir(qwen, tiny)
    assert_same_model(load_reference_checkpoint(tmp_path / "old.pt", qwen, lora=LORA), expected, tiny)


def test_special_tokens_are_appended_in_reference_order(tmp_path, tiny):
    write_qwen_dir(tmp_path, tiny)
    base_size = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    tokenizer = fastslm_tokenizer(tmp_path)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(base_size, base_size + 9))
    assert tokenizer.encode("<|ASR|><|audio_bos|><|AUDIO|><|audio_eos|>").ids == [base_size + i for i in (5, 1, 0, 2)]


def test_convert_cli_writes_folder_and_refuses_to_overwrite(tmp_path, tiny):
    reference, expected = reference_state_dict(tiny)
    torch.save(reference, tmp_path / "ckpt.pt")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    write_qwen_dir(qwen, tiny)
    out = tmp_path / "converted"
    args = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--qwen", str(qwen), "--out", str(out), "--lora-r", "4", "--dtype", "float32"]
    runner = CliRunner()
    result = runner.invoke(convert_app, args)
    assert result.exit_code == 0, result.output
    assert_same_model(FastSLM.from_pretrained(out), expected, tiny)
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    assert tokenizer.token_id("<|SQQA|>") == tokenizer.token_id("<|ASR|>") + 3

    before = (out / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(convert_app, args)
    assert again.exit_code == 2 and "pass --force" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == before

    bad = runner.invoke(convert_app, [*args[:1], str(tmp_path / "missing.pt"), *args[2:], "--force"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # a failed convert keeps the old folder


def test_checkpoint_with_code_is_refused(tmp_path, tiny):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"encoder.compressor1.query": Payload()}, tmp_path / "evil.pt")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    write_qwen_dir(qwen, tiny)
    with pytest.raises(ModelFileError, match="weights-only"):
        load_reference_checkpoint(tmp_path / "evil.pt", qwen)


# ---- the shared generate loop on the PyTorch reference -----------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_dir):
    return Pipeline(TorchBackend.from_folder(tiny_dir), Tokenizer.from_file(tiny_dir / "tokenizer.json"))


def test_cached_decoding_equals_full_recompute(pipeline, jfk_path):
    """The loop's KV-cache decode picks the same greedy tokens as re-running the whole prefix."""
    speech = pipeline.encode(jfk_path)
    cached = pipeline.generate(speech, "transcribe", sampling=SamplingOptions(max_new_tokens=16)).token_ids

    ids = pipeline.tokenizer.encode_prompt(
        "<|im_start|>user\n<|ASR|><|audio_bos|><|AUDIO|><|audio_eos|>\nTranscribe this audio clip into text.<|im_end|>\n<|im_start|>assistant\n"
    )
    embed = pipeline.backend.embed_tokens
    prefix = np.concatenate([embed(np.array(ids.left)), speech.embeddings, embed(np.array(ids.right))])
    model = pipeline.backend.model
    recomputed = []
    with torch.inference_mode():
        for _ in range(16):
            logits = model.llm(inputs_embeds=torch.from_numpy(prefix)[None]).logits[0, -1]
            token = int(logits.argmax())
            if token in pipeline.tokenizer.eos_ids:
                break
            recomputed.append(token)
            prefix = np.concatenate([prefix, embed(np.array([token]))])
    assert cached == recomputed
    assert len(cached) == 16


def test_stream_pieces_join_to_generated_text(pipeline, jfk_path):
    options = SamplingOptions(temperature=0.7, top_k=50, top_p=0.9, seed=5, max_new_tokens=24)
    streamed = "".join(pipeline.stream(jfk_path, "What is the first word?", sampling=options))
    result = pipeline.generate(jfk_path, "What is the first word?", sampling=options)
    assert streamed.rstrip() == result.text and not streamed[:1].isspace()
    assert result.n_windows == 1 and result.audio_seconds == pytest.approx(11.0, abs=0.01)


def test_prefill_cache_can_be_reused_for_several_answers(pipeline, jfk_path):
    speech = pipeline.encode(jfk_path)
    prefill = pipeline.prefill(speech, "What is the first word?")
    kept = prefill.cache.copy()
    options = SamplingOptions(max_new_tokens=8)
    first = list(pipeline.decode_tokens(prefill, options))
    second = list(pipeline.decode_tokens(prefill, options))
    assert first == second
    assert all(np.array_equal(a, b) for a, b in zip(prefill.cache.to_numpy().keys, kept.to_numpy().keys))


def test_encode_matches_model_on_reference_windows(pipeline, tiny, jfk_path):
    mel = audio_to_windows(load_audio(jfk_path), n_mels=80)
    with torch.inference_mode():
        expected = tiny.encode_audio(torch.from_numpy(mel)).reshape(-1, tiny.config.qwen3.hidden_size).numpy()
    assert np.abs(pipeline.encode(jfk_path).embeddings - expected).max() <= 1e-5
