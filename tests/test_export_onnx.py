"""fastslm-export: the graph tables, the bundle it writes (layout, manifest, external data),
and its refusals (existing --out, bad --model, unknown --target) without half bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fastslm.export import bundle_writer
from fastslm.export.bundle_writer import ExportOptions, export_bundle
from fastslm.export.cli import app
from fastslm.export.graphs import graph_specs
from fastslm.export.onnx_export import ExportError
from fastslm.export.targets import TARGETS, decoder_cache_for, get_target
from fastslm.models.fastslm import FastSLM
from fastslm.models.tiny import build_tiny_model, tiny_config
from fastslm.runtime.bundle import load_bundle, sha256_file
from fastslm.runtime.errors import OptionError
from fastslm.runtime.kv_cache import KVCache
from fastslm.runtime.onnx_backend import OnnxBackend

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-export")
    build_tiny_model(folder, seed=3)
    return folder


@pytest.fixture(scope="module")
def external_bundle(tiny_dir, tmp_path_factory):
    """An fp32 bundle with every graph's weights forced into external data, written with --force
    over an older bundle that holds a stale file."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-ext"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "fastslm-bundle"}')
    (out / "stale.txt").write_text("from an older export")
    report = export_bundle(
        ExportOptions(model=tiny_dir, out=out, target="onnx", force=True, external_data_threshold=0, progress=False),
        log=lambda line: None,
    )
    return out, report


# ---- the tables ----------------------------------------------------------------------------


def test_graph_tables_follow_the_conventions():
    config = tiny_config()
    audio, llm = graph_specs(config, "in-place")
    n = config.qwen3.num_layers
    assert [t.name for t in audio.inputs] == ["mel"] and [t.name for t in audio.outputs] == ["speech_tokens"]
    kv_inputs = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    # The in-place decoder also takes the cached length (its attention can update a cache buffer in place);
    # the copied one (TensorRT's, and ONNX Runtime's before 1.32) keeps the plain form.
    assert [t.name for t in llm.inputs] == ["inputs_embeds", "position_ids", "logits_index", "past_length", *kv_inputs]
    copied_llm = graph_specs(config, "copied")[1]
    assert [t.name for t in copied_llm.inputs] == ["inputs_embeds", "position_ids", "logits_index", *kv_inputs]
    assert [t.name for t in llm.outputs] == ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    for spec in (audio, llm):
        symbols = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
        assert symbols == set(spec.dims) == set(spec.trace)
        # torch.export specializes sizes 0 and 1, so every dynamic dim is traced at >= 2.
        assert all(size >= 2 for size in spec.trace.values())
        assert all(d.min <= d.opt <= d.max for d in spec.dims.values())
        assert {"fp32", "fp16"} <= set(spec.tolerances)
        for case in spec.cases:
            assert set(case.sizes) == set(spec.dims)
    assert llm.dims["past"].min == 0  # one graph serves prefill (no past) and decode
    assert any(c.sizes["past"] == 0 for c in llm.cases) and any(c.sizes["seq"] == 1 for c in llm.cases)


def test_target_registry():
    assert {"onnx", "onnx-fp16"} <= set(TARGETS)
    assert get_target("onnx").precision == "fp32" and get_target("onnx-fp16").precision == "fp16"
    assert get_target("onnx-fp16").dtype == torch.float16
    with pytest.raises(OptionError, match="unknown target 'trt-fp17'.*onnx-fp16"):
        get_target("trt-fp17")


def test_decoder_cache_per_target():
    """The in-place graph for the CPU targets ([cpu]: onnxruntime >= 1.32 loads it), the copied one for
    onnx-fp16 (the GPU / Jetson target, whose onnxruntime builds are older) and TensorRT (README "Export")."""
    defaults = {name: decoder_cache_for(target, None) for name, target in TARGETS.items()}
    assert defaults == {"onnx": "in-place", "onnx-fp16": "copied", "onnx-fp16w": "in-place", "trt-fp16": "copied",
                        "onnx-int8": "in-place", "onnx-int4": "in-place", "trt-int8": "copied"}  # fmt: skip
    assert decoder_cache_for(get_target("onnx-int4"), "copied") == "copied"
    assert decoder_cache_for(get_target("onnx-fp16"), "in-place") == "in-place"
    with pytest.raises(OptionError, match="TensorRT cannot run.*trt-int8 bundles keep the copied form"):
        decoder_cache_for(get_target("trt-int8"), "in-place")


# ---- the bundle ----------------------------------------------------------------------------


def test_bundle_layout_and_manifest(external_bundle, tiny_dir):
    out, report = external_bundle
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([
        "manifest.json", "config.json", "tokenizer.json", "embed_tokens.npy",
        "audio_tower.onnx", "audio_tower.onnx.data", "llm.onnx", "llm.onnx.data",
    ])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == report.manifest
    assert (manifest["format"], manifest["format_version"]) == ("fastslm-bundle", 1)
    assert (manifest["target"], manifest["runtime"], manifest["precision"]) == ("onnx", "onnx", "fp32")
    assert manifest["model"] == {"name": "tiny-random", "config_sha256": sha256_file(tiny_dir / "config.json")}
    import onnx
    import onnxruntime

    exporter = manifest["exporter"]
    assert exporter["torch"] == torch.__version__ and exporter["onnx"] == onnx.__version__
    assert exporter["onnxruntime"] == onnxruntime.__version__ and exporter["opset"] == 20
    # Every file but the manifest is listed with its real size and sha256.
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    assert (out / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    # no build-machine paths or source line numbers in the graphs; the module scopes calibration reads stay
    for graph_file in ("audio_tower.onnx", "llm.onnx"):
        keys = {p.key for node in onnx.load(str(out / graph_file), load_external_data=False).graph.node
                for p in node.metadata_props}
        assert "pkg.torch.onnx.name_scopes" in keys and not any("stack_trace" in k for k in keys), keys
    assert str(Path(__file__).resolve().parents[1]) not in (out / "audio_tower.onnx").read_bytes().decode("latin-1")

    config = FastSLM.from_pretrained(tiny_dir).config
    audio, llm = manifest["graphs"]["audio_tower"], manifest["graphs"]["llm"]
    assert audio["data_file"] == "audio_tower.onnx.data" and llm["data_file"] == "llm.onnx.data"
    assert audio["inputs"] == [{"name": "mel", "dtype": "float32", "shape": ["windows", config.n_mels, 3000]}]
    assert audio["outputs"][0]["shape"] == ["windows", config.tokens_per_window, config.qwen3.hidden_size]
    io = {t["name"]: t for t in llm["inputs"] + llm["outputs"]}
    assert io["inputs_embeds"]["shape"] == ["batch", "seq", config.qwen3.hidden_size]
    assert io["position_ids"] == {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert io["logits_index"]["shape"] == ["keep"]
    assert io["logits"]["shape"] == ["batch", "keep", config.qwen3.vocab_size]
    kv = io["past_key_values.1.value"]["shape"]
    assert kv == ["batch", config.qwen3.num_kv_heads, "past", config.qwen3.head_dim]
    assert io["present.1.value"]["shape"][2] in ("seq + past", "past + seq")
    assert llm["dims"]["past"]["min"] == 0
    # The exporter's own check, recorded: every case within the fp32 tolerance.
    for graph in (audio, llm):
        assert graph["validation"]["tolerance"]["max_abs"] == TOL
        for case in graph["validation"]["cases"].values():
            assert all(o["max_abs_diff"] <= TOL for o in case.values()), case
    table = np.load(out / "embed_tokens.npy")
    assert table.dtype == np.float32
    reference = FastSLM.from_pretrained(tiny_dir)
    np.testing.assert_array_equal(table, reference.llm.model.embed_tokens.weight.detach().numpy())


def test_external_data_bundle_matches_pytorch(external_bundle, tiny_dir):
    out, _ = external_bundle
    backend = OnnxBackend(load_bundle(out, runtime="onnx"), threads=1)
    model = FastSLM.from_pretrained(tiny_dir)
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((2, model.config.n_mels, 3000)).astype(np.float32) * 0.5
    with torch.no_grad():
        expected = model.encode_audio(torch.from_numpy(mel)).numpy()
    assert np.abs(backend.encode_windows(mel) - expected).max() <= TOL
    embeds = backend.embed_tokens(np.array([5, 17, 99, 3], dtype=np.int64))
    logits, cache = backend.run_llm(embeds, backend.empty_cache())
    with torch.no_grad():
        ref = model.llm(inputs_embeds=torch.from_numpy(embeds)[None])
    assert np.abs(logits - ref.logits[0].numpy()).max() <= TOL
    assert isinstance(cache, KVCache) and cache.length == 4


def test_llm_graph_reads_the_kv_cache_where_it_lies(external_bundle, tmp_path):
    """A decode step's attention reads each layer's cache once, as stored, and writes only the new
    rows: after ONNX Runtime's fusions, ONNX Runtime's GroupQueryAttention alone reads
    past_key_values.* and writes present.* (Shape aside), so a buffer bound as both is appended to
    in place, with no per-step copy of the cache (half a decode step at 6,000 positions before)."""
    import onnx
    import onnxruntime as ort

    out, _ = external_bundle
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "llm.onnx"), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    writers = {o: n for n in graph.node for o in n.output}
    present = [o.name for o in graph.output if o.name.startswith("present.")]
    assert present
    for name in present:
        past = name.replace("present.", "past_key_values.")
        writer = writers[name]
        assert writer.op_type == "GroupQueryAttention" and past in writer.input, (name, writer.op_type)
        assert readers.get(name, set()) - {"Shape"} == set(), (name, readers[name])
        assert readers[past] - {"Shape"} == {"GroupQueryAttention"}, (past, readers[past])
    # Rotary positions are the op's own (do_rotary, from a cos/sin table ONNX Runtime folds at
    # load): a step computes no angles and no rotate-half, which were 12 kernels a layer.
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all({a.name: a.i for a in n.attribute}.get("do_rotary") == 1 for n in attention)
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Sin", "Cos", "Neg", "Range"}, sorted(ops)


# ---- refusals, through the CLI ----------------------------------------------------------------

runner = CliRunner()


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("fastslm-export: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_a_long_step_without_its_own_bar_still_shows_time_passing():
    import io

    from tqdm import tqdm

    screen = io.StringIO()
    with tqdm(total=3, desc="fastslm-export", file=screen) as bar, bundle_writer._redrawn_every_second(bar):
        bar.set_postfix_str("tracing llm (no weights)")
        time.sleep(3.5)  # a step with no bar of its own (100 s at the published size)
    drawn = [d for d in screen.getvalue().split("\r") if "tracing llm" in d]
    # one draw when the step starts, then one a second while it lasts, each with the time so far
    assert len(drawn) >= 3 and len({d.split("[", 1)[1][:5] for d in drawn}) >= 3, drawn


def test_unknown_target(tiny_dir, tmp_path):
    line = one_error_line(runner.invoke(app, ["--model", str(tiny_dir), "--out", str(tmp_path / "b"), "--target", "onnx-int3"]))
    assert "unknown target 'onnx-int3'" in line and "onnx-fp16" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, needle", [
    (["--decoder-cache", "inplace"], "unknown --decoder-cache 'inplace'; choose in-place or copied"),
    (["--decoder-cache", "in-place", "--target", "trt-fp16"], "TensorRT cannot run"),
])  # fmt: skip
def test_bad_decoder_cache(tiny_dir, tmp_path, args, needle):
    line = one_error_line(runner.invoke(app, ["--model", str(tiny_dir), "--out", str(tmp_path / "b"), *args]))
    assert needle in line, line
    assert not (tmp_path / "b").exists()


def test_in_place_export_needs_an_onnxruntime_that_validates_it(tiny_dir, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")
    line = one_error_line(runner.invoke(app, ["--model", str(tiny_dir), "--out", str(tmp_path / "b")]))
    assert "needs onnxruntime >= 1.32" in line and "this is 1.31.1" in line and "--decoder-cache copied" in line, line
    assert not (tmp_path / "b").exists()


def test_missing_model(tmp_path):
    line = one_error_line(runner.invoke(app, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]))
    assert "does not exist" in line
    assert not (tmp_path / "b").exists()


def test_not_a_model_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    line = one_error_line(runner.invoke(app, ["--model", str(folder), "--out", str(tmp_path / "b")]))
    assert "not a fastslm model folder" in line


def test_refuses_to_overwrite_without_force(tiny_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(runner.invoke(app, ["--model", str(tiny_dir), "--out", str(out)]))
    assert "--force" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_to_replace_the_model_folder(tiny_dir):
    line = one_error_line(runner.invoke(app, ["--model", str(tiny_dir), "--out", str(tiny_dir), "--force"]))
    assert "which this command reads" in line


def test_errors_are_one_line_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastslm.export.cli", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"fastslm-export: error: model folder {tmp_path / 'nope'} does not exist; pass a fastslm model folder (see `fastslm-convert`)"
    ]


@pytest.mark.parametrize("had_bundle", [False, True], ids=["new", "force-over-old"])
def test_failed_export_leaves_no_half_bundle(tiny_dir, tmp_path, monkeypatch, had_bundle):
    """The audio tower is exported and validated, then the LLM fails: nothing may appear at --out
    (or the old bundle must survive a failed --force), and no staging folder may be left."""
    out = tmp_path / "bundle"
    if had_bundle:
        out.mkdir()
        (out / "manifest.json").write_text('{"format": "fastslm-bundle"}')
    real_export = bundle_writer.export_graph

    def failing_export(spec, *args, **kwargs):
        if spec.name == "llm":
            raise ExportError("llm: simulated failure")
        return real_export(spec, *args, **kwargs)

    monkeypatch.setattr(bundle_writer, "export_graph", failing_export)
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(ExportOptions(model=tiny_dir, out=out, force=had_bundle, progress=False), log=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bundle"] if had_bundle else [])
    if had_bundle:
        assert [p.name for p in out.iterdir()] == ["manifest.json"]
        assert (out / "manifest.json").read_text() == '{"format": "fastslm-bundle"}'
