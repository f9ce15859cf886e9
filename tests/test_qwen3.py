"""Qwen3 decoder: parity with transformers, KV-cache decoding, loading and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastslm.models.qwen3 import Qwen3Dims, Qwen3ForCausalLM, causal_mask, grouped_attention
from fastslm.runtime.errors import ModelFileError
from fastslm.runtime.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def tiny_hf(tied: bool, seed: int = 0):
    config = transformers.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # every weight random and O(1) logits, norms included, so a mistake shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_folder(request, tmp_path_factory) -> tuple[object, Path]:
    model = tiny_hf(tied=request.param)
    folder = tmp_path_factory.mktemp("qwen3_tied" if request.param else "qwen3_untied")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory) -> tuple[object, Path]:
    model = tiny_hf(tied=True, seed=1)
    folder = tmp_path_factory.mktemp("qwen3_sharded")
    model.save_pretrained(folder, max_shard_size="100KB")
    return model, folder


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(hf_folder):
    hf, folder = hf_folder
    ours = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    expected = hf(x).logits
    got = ours(x).logits
    assert got.shape == (2, 11, 256) and got.dtype == torch.float32
    diff = max_diff(got, expected)
    assert diff <= TOL, f"logits differ from transformers by {diff:.3e}"
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert ours.lm_head.weight is ours.model.embed_tokens.weight if ours.dims.tie_word_embeddings else True


@torch.no_grad()
def test_sharded_checkpoint(sharded_folder):
    hf, folder = sharded_folder
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    ours = Qwen3ForCausalLM.from_pretrained(folder)
    diff = max_diff(ours(ids()).logits, hf(ids()).logits)
    assert diff <= TOL, f"sharded logits differ from transformers by {diff:.3e}"


@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(hf_folder):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    full = model(x).logits  # (2, 11, V)

    out = model(x[:, :7])
    assert out.past.length == 7 and out.past.keys[0].shape == (2, 2, 7, 16)
    steps = [out.logits]
    past = out.past
    for t in range(7, 11):
        out = model(x[:, t : t + 1], past=past)
        steps.append(out.logits)
        past = out.past
    cached = torch.cat(steps, dim=1)
    assert past.length == 11
    diff = max_diff(cached, full)
    assert diff <= TOL, f"cached decode differs from the full forward by {diff:.3e}"


@torch.no_grad()
def test_zero_length_past_and_explicit_core(hf_folder):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    full = model(x).logits
    empty = model.empty_cache(2, torch.float32, "cpu")
    assert empty.length == 0 and empty.num_layers == 2 and empty.keys[0].shape == (2, 2, 0, 16)

    positions = torch.arange(11).expand(2, 11)
    logits, keys, values = model.forward_embeds(model.embed(x), positions, empty.keys, empty.values)
    diff = max_diff(logits, full)
    assert diff <= TOL, f"prefill on a zero-length past differs by {diff:.3e}"
    assert [k.shape[2] for k in keys] == [11, 11] and [v.shape[2] for v in values] == [11, 11]

    # Prefill on a zero-length past, then continue two chunks with explicit positions.
    out = model(x[:, :5], past=empty)
    out2 = model(x[:, 5:9], past=out.past, position_ids=torch.arange(5, 9).expand(2, 4))
    out3 = model(x[:, 9:], past=out2.past)
    diff = max_diff(torch.cat([out.logits, out2.logits, out3.logits], dim=1), full)
    assert diff <= TOL, f"chunked prefill differs by {diff:.3e}"


@torch.no_grad()
def test_cache_is_not_mutated_and_can_be_reused(hf_folder):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    prefix = model(x[:, :7]).past
    kept = prefix.copy()
    a = model(x[:, 7:9], past=prefix).logits
    b = model(x[:, 7:9], past=prefix).logits  # same prefix asked twice
    assert torch.equal(a, b)
    assert all(torch.equal(k, k0) for k, k0 in zip(prefix.keys, kept.keys))


@torch.no_grad()
def test_inputs_embeds_and_last_only(hf_folder):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    by_ids = model(input_ids=x).logits
    by_embeds = model(inputs_embeds=model.embed(x)).logits
    assert torch.equal(by_ids, by_embeds)
    last = model(x, last_only=True)
    assert last.logits.shape == (2, 1, 256) and last.past.length == 11
    diff = max_diff(last.logits[:, 0], by_ids[:, -1])
    assert diff <= TOL, f"last_only differs by {diff:.3e}"
    with pytest.raises(ValueError):
        model(input_ids=x, inputs_embeds=model.embed(x))


def test_causal_mask():
    mask = causal_mask(2, 5, torch.device("cpu"))  # past 3, two new tokens
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert causal_mask(3, 3, torch.device("cpu")).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("past", [0, 5])
def test_grouped_attention_graph_form_equals_eager_and_per_head_attention(monkeypatch, past):
    g = torch.Generator().manual_seed(past)
    B, kv, group, T, hd = 2, 2, 3, 4, 16
    S = past + T
    q = torch.randn(B, kv, group * T, hd, generator=g)
    k, v = torch.randn(B, kv, S, hd, generator=g), torch.randn(B, kv, S, hd, generator=g)
    eager = grouped_attention(q, k, v, causal_mask(T, S, torch.device("cpu")).repeat(group, 1))
    # Query head h = kv_head * group + j attends K, V head kv_head: the textbook form, K and V repeated per head.
    heads = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, kv * group, T, hd), k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
        attn_mask=causal_mask(T, S, torch.device("cpu")),
    )
    assert max_diff(eager.reshape(B, kv * group, T, hd), heads) <= 1e-5
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # the form exported graphs compute
    graph = grouped_attention(q, k, v, causal_mask(T, S, torch.device("cpu")).repeat(group, 1))
    assert max_diff(graph, eager) <= 1e-5


def test_dims_from_hf_config(hf_folder):
    hf, folder = hf_folder
    dims = Qwen3Dims.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert dims == Qwen3Dims(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=hf.config.tie_word_embeddings, max_position_embeddings=32768)
    assert Qwen3Dims.from_dict(dims.to_dict()) == dims
    # transformers 4.x layout: rope_theta at the top level, rope_scaling null, head_dim absent.
    old = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6, "rope_scaling": None}
    legacy = Qwen3Dims.from_hf_config(old)
    assert legacy.rope_theta == 1e6 and legacy.head_dim == 16 and not legacy.tie_word_embeddings
    with pytest.raises(ModelFileError, match="yarn"):
        Qwen3Dims.from_hf_config({**old, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelFileError, match="yarn"):
        Qwen3Dims.from_hf_config({**old, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
    with pytest.raises(ModelFileError, match="num_hidden_layers"):
        Qwen3Dims.from_hf_config({k: v for k, v in old.items() if k != "num_hidden_layers"})


def test_qwen3_4b_dims_count():
    dims = Qwen3Dims.qwen3_4b()
    with torch.device("meta"):
        model = Qwen3ForCausalLM(dims)
    n = sum(p.numel() for p in model.parameters())  # parameters() counts the tied head once
    assert 4.0e9 <= n <= 4.1e9, n


def test_state_dict_tied_roundtrip(hf_folder):
    hf, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    assert ("lm_head.weight" in state) != hf.config.tie_word_embeddings
    fresh = Qwen3ForCausalLM(model.dims)
    fresh.load_state_dict(state)
    fresh = fresh.to(torch.bfloat16)
    if model.dims.tie_word_embeddings:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


def test_bfloat16_load(hf_folder):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids())
    assert out.logits.dtype == torch.float32 and out.past.keys[0].dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()


# ---- errors: one line, a ModelFileError


def one_line_error(folder: Path, match: str) -> str:
    with pytest.raises(ModelFileError, match=match) as info:
        Qwen3ForCausalLM.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_missing_folder_and_config(tmp_path):
    one_line_error(tmp_path / "nope", "does not exist")
    one_line_error(tmp_path, "config.json")


def test_missing_weights(hf_folder, tmp_path):
    _, folder = hf_folder
    broken = copy_folder(folder, tmp_path / "m")
    (broken / "model.safetensors").unlink()
    one_line_error(broken, "neither model.safetensors")


def test_missing_shard(sharded_folder, tmp_path):
    _, folder = sharded_folder
    broken = copy_folder(folder, tmp_path / "m")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    message = one_line_error(broken, "is missing")
    assert shard.name in message


def test_wrong_shape_and_missing_key(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_folder
    state = load_file(folder / "model.safetensors")

    wrong = copy_folder(folder, tmp_path / "wrong")
    save_file({**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 64)}, wrong / "model.safetensors")
    message = one_line_error(wrong, "shape")
    assert "model.layers.1.mlp.up_proj.weight" in message and "[64, 64]" in message and "[128, 64]" in message

    missing = copy_folder(folder, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, missing / "model.safetensors")
    assert "model.norm.weight" in one_line_error(missing, "lacks")

    extra = copy_folder(folder, tmp_path / "extra")
    save_file({**state, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, extra / "model.safetensors")
    assert "model.layers.2.mlp.up_proj.weight" in one_line_error(extra, "unexpected")

    corrupt = copy_folder(folder, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 20)
    one_line_error(corrupt, "cannot read")

    mismatched = copy_folder(folder, tmp_path / "cfg")
    config = json.loads((folder / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    one_line_error(mismatched, "lacks")


def test_kv_cache_object_roundtrip(hf_folder, tmp_path):
    _, folder = hf_folder
    model = Qwen3ForCausalLM.from_pretrained(folder)
    x = ids()
    with torch.no_grad():
        out = model(x[:, :7])
        out.past.save(tmp_path / "cache.npz")
        loaded = KVCache.load(tmp_path / "cache.npz")
        past = KVCache([torch.from_numpy(k) for k in loaded.keys], [torch.from_numpy(v) for v in loaded.values])
        a = model(x[:, 7:], past=past).logits
        b = model(x[:, 7:], past=out.past).logits
    assert torch.equal(a, b)


def test_assign_checked_ignore_patterns():
    from fastslm.models.weights import assign_checked

    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.register_buffer("pos_embeds", torch.arange(4.0))  # derived at construction

    module = WithBuffer()
    tensors = {"proj.weight": torch.ones(2, 3), "proj.bias": torch.zeros(2), "rotary_emb.inv_freq": torch.ones(2)}
    assign_checked(module, tensors, ignore=("*pos_embeds", "*inv_freq"), source="test")
    assert torch.equal(module.proj.weight, torch.ones(2, 3)) and torch.equal(module.pos_embeds, torch.arange(4.0))
    with pytest.raises(ModelFileError, match="lacks pos_embeds"):
        assign_checked(module, tensors, ignore=("*inv_freq",), source="test")
