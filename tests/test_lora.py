"""LoRA merging: merged weights equal W + (alpha/r) B@A, and the merged Qwen3 equals base + explicit LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastslm.models.lora import merge_lora_into, merge_lora_pair, merge_peft_state_dict
from fastslm.models.qwen3 import Qwen3Dims, Qwen3ForCausalLM
from fastslm.models.weights import assign_checked
from fastslm.runtime.errors import ModelFileError

PREFIX = "llm.base_model.model."
ALPHA, R = 64, 4
SCALE = ALPHA / R
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DIMS = Qwen3Dims(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)


def is_target(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in TARGETS


@pytest.fixture(scope="module")
def base_and_lora() -> tuple[Qwen3ForCausalLM, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(DIMS).eval()
    lora = {}
    for name, w in base.state_dict().items():
        if is_target(name):
            out_features, in_features = w.shape
            lora[name[: -len(".weight")]] = (torch.randn(R, in_features) / in_features**0.5,  # A (r, in)
                                             torch.randn(out_features, R) * 0.02)  # B (out, r), nonzero
    return base, lora


def peft_state(base: Qwen3ForCausalLM, lora: dict, adapter: str = ".default") -> dict[str, torch.Tensor]:
    """The reference checkpoint's layout: LLM under PEFT names, plus an unrelated encoder key."""
    state = {"encoder.llm_proj.weight": torch.randn(64, 32)}
    for name, w in base.state_dict().items():
        module = name[: -len(".weight")]
        if module in lora:
            a, b = lora[module]
            state[f"{PREFIX}{module}.base_layer.weight"] = w.clone()
            state[f"{PREFIX}{module}.lora_A{adapter}.weight"] = a
            state[f"{PREFIX}{module}.lora_B{adapter}.weight"] = b
        else:
            state[PREFIX + name] = w.clone()
    state[PREFIX + "lm_head.weight"] = base.state_dict()["model.embed_tokens.weight"].clone()  # tied, saved by PEFT
    return state


def test_merged_weights(base_and_lora):
    base, lora = base_and_lora
    merged = merge_peft_state_dict(peft_state(base, lora), prefix=PREFIX, alpha=ALPHA, r=R)
    base_state = base.state_dict()
    assert "encoder.llm_proj.weight" not in merged and "lm_head.weight" in merged
    assert set(merged) == set(base_state) | {"lm_head.weight"}
    assert not any("lora" in k or "base_layer" in k for k in merged)
    for module, (a, b) in lora.items():
        expected = base_state[module + ".weight"] + SCALE * b @ a
        torch.testing.assert_close(merged[module + ".weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base_state["model.norm.weight"])


@torch.no_grad()
def test_merged_model_equals_base_with_explicit_lora(base_and_lora):
    base, lora = base_and_lora
    merged = merge_peft_state_dict(peft_state(base, lora), prefix=PREFIX, alpha=ALPHA, r=R)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(DIMS)
    assign_checked(model, merged, ignore=("lm_head.weight",), source="merged state")
    model.eval()

    reference = Qwen3ForCausalLM(DIMS).eval()
    reference.load_state_dict(base.state_dict())
    for module_name, (a, b) in lora.items():
        linear = reference.get_submodule(module_name)
        w = linear.weight
        linear.forward = lambda x, w=w, a=a, b=b: F.linear(x, w) + SCALE * F.linear(F.linear(x, a), b)

    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    got, expected = model(x).logits, reference(x).logits
    plain = base(x).logits
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"merged LoRA logits differ from base + explicit LoRA by {diff:.3e}"
    assert (plain - expected).abs().max().item() > 1e-2  # the LoRA delta does change the output


def test_merge_lora_into_adapter_only(base_and_lora):
    base, lora = base_and_lora
    # A PEFT adapter file: LoRA keys only, no adapter name, plus a non-LLM weight (the HFQ-Former's).
    adapter = {"encoder.llm_proj.weight": torch.randn(64, 32)}
    for module, (a, b) in lora.items():
        adapter[f"{PREFIX}{module}.lora_A.weight"] = a
        adapter[f"{PREFIX}{module}.lora_B.weight"] = b
    model_state = base.state_dict()
    merged = merge_lora_into(model_state, adapter, prefix=PREFIX, alpha=ALPHA, r=R)
    reference = merge_peft_state_dict(peft_state(base, lora), prefix=PREFIX, alpha=ALPHA, r=R)
    assert set(merged) == set(model_state)
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], model_state["model.layers.0.self_attn.q_proj.weight"])


def test_merge_keeps_dtype():
    torch.manual_seed(0)
    w = torch.randn(8, 6).bfloat16()
    a, b = torch.randn(2, 6).bfloat16(), torch.randn(8, 2).bfloat16()
    merged = merge_lora_pair(w, a, b, 2.0)
    assert merged.dtype == torch.bfloat16
    expected = (w.float() + 2.0 * b.float() @ a.float()).bfloat16()
    assert torch.equal(merged, expected)


def test_errors(base_and_lora):
    base, lora = base_and_lora
    state = peft_state(base, lora)
    key_a = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.default.weight"
    key_b = key_a.replace("lora_A", "lora_B")

    def fails(bad: dict, match: str, r: int = R) -> None:
        with pytest.raises(ModelFileError, match=match) as info:
            merge_peft_state_dict(bad, prefix=PREFIX, alpha=ALPHA, r=r)
        assert "\n" not in str(info.value)

    fails({k: v for k, v in state.items() if k != key_b}, "no lora_B")
    fails({k: v for k, v in state.items() if k != key_a}, "no lora_A")
    fails({**state, key_b: torch.randn(10, R)}, "disagree")
    fails(state, "rank", r=8)
    fails({k: v for k, v in state.items() if not (k.endswith("q_proj.base_layer.weight") and ".0." in k)}, "no base_layer")
    fails({**state, f"{PREFIX}model.layers.0.mlp.up_proj.lora_magnitude_vector.default.weight": torch.ones(128)},
          "unsupported")
    with pytest.raises(ModelFileError, match="no such weight"):
        merge_lora_into({}, {key_a: state[key_a], key_b: state[key_b]}, prefix=PREFIX, alpha=ALPHA, r=R)
    with pytest.raises(ModelFileError, match="disagree"):
        merge_lora_pair(torch.zeros(8, 6), torch.zeros(2, 5), torch.zeros(8, 2), 1.0)
