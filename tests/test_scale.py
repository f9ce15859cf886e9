"""The published FastSLM's size: random weights at its shapes, the streamed LLM export, a run.

The published model (Whisper large-v3 encoder, HFQ-Former at width 1280, Qwen3-4B) cannot be
downloaded here, but its shapes are public. `fastslm-convert --random-init published` writes
random weights of those shapes; with one encoder and one LLM layer the model keeps every width
and the full 151,936-row vocabulary (1.14 GB of fp16), so the export meets the real embedding
table, external data and the streamed LLM path, and the runtime the real tensor shapes.
docs/SCALE.md has the full-size measurements.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fastslm.models.convert import app as convert_app
from fastslm.models.random_init import published_config, random_tensor, stored_shapes
from fastslm.models.weights import SafetensorsFolder

runner = CliRunner()

# The published shapes (ARCHITECTURE.md), as stored in a model folder.
PUBLISHED = {
    "audio_tower.whisper.conv1.weight": (1280, 128, 3),
    "audio_tower.whisper.conv2.weight": (1280, 1280, 3),
    "audio_tower.whisper.blocks.0.attn.query.weight": (1280, 1280),
    "audio_tower.whisper.blocks.0.mlp.0.weight": (5120, 1280),
    "audio_tower.hfq_former.compressor1.query": (1, 80, 1280),
    "audio_tower.hfq_former.compressor.query": (1, 50, 1280),
    "audio_tower.hfq_former.llm_proj.weight": (2560, 1280),
    "llm.model.embed_tokens.weight": (151936, 2560),
    "llm.model.layers.0.self_attn.q_proj.weight": (4096, 2560),
    "llm.model.layers.0.self_attn.k_proj.weight": (1024, 2560),
    "llm.model.layers.0.self_attn.v_proj.weight": (1024, 2560),
    "llm.model.layers.0.self_attn.o_proj.weight": (2560, 4096),
    "llm.model.layers.0.self_attn.q_norm.weight": (128,),
    "llm.model.layers.0.mlp.gate_proj.weight": (9728, 2560),
    "llm.model.layers.0.mlp.down_proj.weight": (2560, 9728),
}


def test_published_config_has_the_published_shapes_and_size():
    shapes = stored_shapes(published_config())
    for name, shape in PUBLISHED.items():
        assert shapes[name] == shape, name
    assert sum(1 for n in shapes if n.endswith("attn.query.weight") and "whisper" in n) == 32
    assert sum(1 for n in shapes if n.endswith("q_proj.weight")) == 36
    params = sum(torch.Size(s).numel() for s in shapes.values())
    # ~635 M Whisper encoder + ~56 M HFQ-Former + ~4.02 B Qwen3-4B (tied head stored once)
    assert 4.65e9 < params < 4.75e9, params
    fewer = stored_shapes(published_config(llm_layers=2, encoder_layers=3))
    assert fewer["llm.model.embed_tokens.weight"] == (151936, 2560)
    assert sum(1 for n in fewer if n.endswith("q_proj.weight")) == 2


def test_random_tensors_are_reproducible_per_name():
    a = random_tensor("llm.model.layers.3.mlp.up_proj.weight", (64, 32), torch.float16, seed=1)
    assert a.dtype == torch.float16
    assert torch.equal(a, random_tensor("llm.model.layers.3.mlp.up_proj.weight", (64, 32), torch.float16, seed=1))
    assert not torch.equal(a, random_tensor("llm.model.layers.3.mlp.up_proj.weight", (64, 32), torch.float16, seed=2))
    assert not torch.equal(a, random_tensor("llm.model.layers.4.mlp.up_proj.weight", (64, 32), torch.float16, seed=1))
    assert abs(a.float().std().item() - 32**-0.5) < 0.02  # N(0, 1/fan_in)
    assert torch.equal(random_tensor("x.norm.weight", (8,), torch.float16, 0), torch.ones(8, dtype=torch.float16))


def test_random_init_refuses_bad_options(tmp_path):
    result = runner.invoke(convert_app, ["--random-init", "huge", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--random-init 'huge' is unknown" in result.output
    result = runner.invoke(convert_app, ["--random-init", "published", "--llm-layers", "0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--llm-layers must be between 1 and 64" in result.output
    result = runner.invoke(convert_app, ["--llm-layers", "2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "apply to --random-init only" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_anon_peak_sees_memory_the_process_touched_and_freed():
    from fastslm.export.scale import AnonPeak

    with AnonPeak() as anon:
        block = np.ones(256 << 20, np.uint8)  # 256 MiB of anonymous pages, every one touched
        time.sleep(0.3)  # a few sampling periods
        del block
    assert anon.peak >= 256 << 20


def test_measure_records_the_commands_anonymous_peak(tmp_path):
    import sys

    from fastslm.export.scale import app as scale_app

    record = tmp_path / "scale.jsonl"
    touch = "import numpy as np, time; b = np.ones(300 << 20, np.uint8); time.sleep(0.5); del b"
    result = CliRunner().invoke(scale_app, ["measure", "--label", "touch 300 MiB", "--record", str(record), "--",
                                            sys.executable, "-c", touch])  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(record.read_text().splitlines()[-1])
    assert 300 << 20 <= row["peak_anonymous_rss_bytes"] <= row["peak_rss_bytes"], row


def test_measure_refuses_a_command_that_cannot_run_in_one_line(tmp_path):
    from fastslm.export.scale import app as scale_app

    record = tmp_path / "new" / "scale.jsonl"  # its folder does not exist yet
    result = CliRunner().invoke(scale_app, ["measure", "--label", "x", "--record", str(record), "--", "/no/such/program"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "cannot run '/no/such/program'" in result.output and not record.exists()


def test_published_width_exports_to_int4_and_runs(tmp_path, jfk_path):
    """1 encoder + 1 LLM layer at full width and vocabulary: convert, onnx-int4 (LLM streamed), run."""
    from fastslm.calibration.build import QuantOptions
    from fastslm.export.bundle_writer import ExportOptions, export_bundle
    from fastslm.runtime.generate import Pipeline
    from fastslm.runtime.onnx_backend import OnnxBackend
    from fastslm.runtime.sampling import SamplingOptions
    from fastslm.runtime.tokenizer import Tokenizer

    model = tmp_path / "model"
    result = runner.invoke(convert_app, ["--random-init", "published", "--llm-layers", "1", "--encoder-layers", "1",
                                         "--out", str(model)])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = SafetensorsFolder(model)
    for name, shape in PUBLISHED.items():
        assert store.shape(name) == shape, name
    assert store.get("llm.model.embed_tokens.weight").dtype == torch.float16
    assert len(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]) == len(store.keys())

    bundle = tmp_path / "int4"
    quant = QuantOptions(audio=(jfk_path,), sensitivity_windows=0, gate_windows=1, wer_items=0, progress=False)
    report = export_bundle(ExportOptions(model=model, out=bundle, target="onnx-int4", quantization=quant, progress=False),
                           log=lambda line: None)  # fmt: skip
    manifest = report.manifest
    assert "tracing llm (no weights)" in report.timings  # the LLM took the streamed path (its fp32 is 2 GB)
    assert manifest["embeddings"]["shape"] == [151936, 2560]
    llm = manifest["graphs"]["llm"]
    assert llm["precision"] == "int4" and llm["data_file"] == "llm.onnx.data"
    shapes = {t["name"]: t["shape"] for t in llm["inputs"] + llm["outputs"]}
    assert shapes["inputs_embeds"][-1] == 2560 and shapes["logits"][-1] == 151936
    assert shapes["past_key_values.0.key"][1:] == [8, "past", 128]
    assert manifest["quantization"]["llm"]["layers_quantized"] == 8  # q k v o gate up down + the tied head
    assert manifest["graphs"]["audio_tower"]["inputs"][0]["shape"] == ["windows", 128, 3000]
    # The INT4 graph against fp32 PyTorch computing with the same INT4 weights, layer by layer.
    assert "INT4 weights" in llm["validation"]["reference"]
    assert all(case["logits"]["min_cosine"] >= 0.99 for case in llm["validation"]["cases"].values())

    backend = OnnxBackend.from_bundle(bundle)
    tokenizer = Tokenizer.from_file(bundle / "tokenizer.json")
    pipe = Pipeline(backend, tokenizer)
    speech = pipe.encode(str(jfk_path))
    assert speech.embeddings.shape == (50, 2560) and np.isfinite(speech.embeddings).all()
    result = pipe.generate(speech, "transcribe", sampling=SamplingOptions(temperature=0.0, max_new_tokens=3))
    assert 1 <= len(result.token_ids) <= 3 and all(0 <= t < 151936 for t in result.token_ids)
    assert result.prompt_tokens > 50
