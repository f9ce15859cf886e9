"""Calibrated exports (onnx-int8, onnx-int4, trt-int8) of the tiny model, their gates, and the CLIs.

The tiny model's LLM is re-initialised with unit-scale weights (as in test_onnx_runtime), so its
logits are decisive and the top-1 agreement gate means something; its random audio tower still
gives a meaningful speech-token cosine. The WER gate is skipped for it (the table says why);
once the shipped demo model exists, the `demo` cases export it and hold it to the issue's gates
(INT8 audio tower and INT8 LLM: +0.5 WER points, INT4 LLM: +2 points, speech cosine >= 0.99).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastslm.calibration.build import QuantOptions
from fastslm.calibration.cli import app as calibrate_app
from fastslm.calibration.data import CalibrationSet
from fastslm.calibration.gates import GateError, GateThresholds
from fastslm.calibration.qdq import INT4_BLOCK, INT8_MAX, INT16_MAX, integer_kernels, saturating_layers, worst_u8s8_pair_sum
from fastslm.calibration.ranges import RANGES_FILE, Ranges
from fastslm.export.bundle_writer import ExportOptions, export_bundle
from fastslm.export.cli import app as export_app
from fastslm.models.tiny import build_tiny_model
from fastslm.runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from fastslm.runtime.errors import OptionError
from fastslm.runtime.loading import DEFAULT_MODEL_FOLDER
from fastslm.runtime.onnx_backend import OnnxBackend

from .conftest import have_tensorrt

pytestmark = pytest.mark.slow
runner = CliRunner()


def decisive_tiny(folder: Path) -> Path:
    """A tiny random model whose greedy answers vary (see build_tiny_model's varied_llm)."""
    build_tiny_model(folder, seed=2, varied_llm=True)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return decisive_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def recordings(jfk_path, tmp_path_factory) -> Path:
    """jfk.flac, two louder / quieter parts of it and a silent file: 3 windows of speech."""
    folder = tmp_path_factory.mktemp("recordings")
    jfk = load_audio(jfk_path)
    sf.write(folder / "a_jfk.flac", jfk, SAMPLE_RATE)
    sf.write(folder / "b_loud.wav", np.clip(jfk[: 6 * SAMPLE_RATE] * 2.5, -1, 1), SAMPLE_RATE)
    sf.write(folder / "c_quiet.wav", jfk[4 * SAMPLE_RATE :] * 0.3, SAMPLE_RATE)
    sf.write(folder / "d_silence.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    return folder


@pytest.fixture(scope="module")
def calib(tiny, recordings, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "calib"
    result = runner.invoke(calibrate_app, ["--model", str(tiny), "--out", str(out), "--audio", str(recordings),
                                           "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 windows from 3 recordings, 1 silent skipped" in result.output
    return out


def export(model: Path, out: Path, target: str, log: list[str] | None = None, **quant) -> dict:
    options = QuantOptions(**{"sensitivity_windows": 2, "gate_windows": 3, "progress": False, **quant})
    lines = log if log is not None else []
    export_bundle(ExportOptions(model=model, out=out, target=target, force=True, progress=False, quantization=options),
                  log=lines.append)  # fmt: skip
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "bundle"
    export_bundle(ExportOptions(model=tiny, out=out, progress=False), log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def int8(tiny, calib, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out, log = tmp_path_factory.mktemp("int8") / "bundle", []
    return out, export(tiny, out, "onnx-int8", log, calibration=calib), log


@pytest.fixture(scope="module")
def int4(tiny, calib, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out, log = tmp_path_factory.mktemp("int4") / "bundle", []
    return out, export(tiny, out, "onnx-int4", log, calibration=calib), log


def rows(manifest: dict) -> dict[str, dict]:
    return {r["gate"].split(" (")[0]: r for r in manifest["quantization"]["gates"]["rows"]}


# ---------------------------------------------------------------------------------------------
# onnx-int8 / onnx-int4


def test_int8_export_passes_its_gates_and_records_them(int8, calib):
    _, manifest, log = int8
    assert manifest["target"] == "onnx-int8" and manifest["precision"] == "int8"
    assert {g: e["precision"] for g, e in manifest["graphs"].items()} == {"audio_tower": "int8", "llm": "int8"}
    gates = rows(manifest)
    assert manifest["quantization"]["gates"]["passed"] and not manifest["quantization"]["gates_overridden"]
    assert gates["speech-token cosine"]["value"] >= 0.99
    assert gates["LLM top-1 agreement, INT8 weights"]["value"] >= 0.95
    for name in ("WER, INT8 audio tower + FP32 LLM", "WER, FP32 audio tower + INT8 LLM", "WER, whole bundle"):
        assert gates[name]["passed"] is None and "does not transcribe yet" in gates[name]["note"]  # the FP32 probe
    table = "\n".join(log)
    assert "accuracy gates: onnx-int8 vs FP32 (tiny-random)" in table and "LLM top-1 agreement" in table
    audio = manifest["quantization"]["audio_tower"]
    assert audio["method"] == "percentile" and audio["layers_int8"] + len(audio["keep_float"]) == len(audio["amax"])
    assert audio["sensitivity"]["windows"] == 2 and len(audio["sensitivity"]["most_sensitive"]) == 10
    # The ranges came from the calibration folder, unchanged.
    assert "calibration: activation ranges from" in table
    saved = Ranges.load(calib / RANGES_FILE).amax("percentile")
    assert audio["amax"] == {k: round(v, 6) for k, v in saved.items()}


def test_int8_graphs_follow_the_explicit_quantization_rules(int8, tmp_path):
    bundle, _, _ = int8
    audio = onnx.load(str(bundle / "audio_tower.onnx"))
    produced = {o: n for n in audio.graph.node for o in n.output}
    inits = {i.name: i for i in audio.graph.initializer}
    ops = [n.op_type for n in audio.graph.node]
    assert ops.count("QuantizeLinear") > 20 and "Softmax" in ops
    for node in audio.graph.node:
        if node.op_type == "QuantizeLinear":
            assert node.input[0] == "mel" or produced[node.input[0]].op_type != "Softmax"
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].data_type == onnx.TensorProto.INT8  # no int32 biases
        if node.op_type == "Conv":
            assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT  # float bias
    llm = onnx.load(str(bundle / "llm.onnx"))
    assert "QuantizeLinear" not in {n.op_type for n in llm.graph.node}  # weight-only
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "llm_opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(bundle / "llm.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(tmp_path / "llm_opt.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 15  # every weight matrix of the 2-layer LLM (7 a layer) and the LM head
    assert {a.i for n in fused for a in n.attribute if a.name == "bits"} == {8}


def test_cpu_int8_bundles_cannot_saturate_on_any_x86_cpu(int8, int4, as_ort_runs_it):
    """The bundles' audio towers keep full-range int8 weights (which U8S8 kernels saturate on CPUs
    without VNNI), and in the graph ONNX Runtime runs for fastslm's sessions no integer kernel is
    left with them: read from the optimized graph, so it fails on any machine if the U8U8 rewrite
    stops happening (a session option dropped, a fusion ONNX Runtime no longer converts)."""
    for bundle, manifest, _ in (int8, int4):
        audio_tower = bundle / "audio_tower.onnx"
        written = worst_u8s8_pair_sum(onnx.load(str(audio_tower)))
        assert len(written) == manifest["quantization"]["audio_tower"]["layers_int8"] > 0
        assert max(written.values()) == 255 * 2 * INT8_MAX > INT16_MAX
        ours, default = as_ort_runs_it(audio_tower), as_ort_runs_it(audio_tower, fastslm_options=False)
        assert integer_kernels(ours) > 0 and saturating_layers(ours) == {}
        assert saturating_layers(default), "the check above would pass vacuously"


def test_an_int8_bundle_from_before_the_weight_zero_points_still_runs_and_says_so(int8, tmp_path, jfk_path):
    """Bundles exported before the weights carried zero points cannot take ONNX Runtime's U8U8 rewrite
    (it fails at run time on them): they run as they always did, with one warning to re-export."""
    import shutil
    import warnings

    from fastslm.runtime.bundle import sha256_file
    from fastslm.runtime.errors import ModelWarning

    old = tmp_path / "old"
    shutil.copytree(int8[0], old)
    graph = onnx.load(str(old / "audio_tower.onnx"))
    inits = {i.name for i in graph.graph.initializer}
    stripped = 0
    for node in graph.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in inits:
            del node.input[2]
            stripped += 1
    assert stripped == int8[1]["quantization"]["audio_tower"]["layers_int8"]
    onnx.save(graph, str(old / "audio_tower.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["quantization"]["audio_tower"]["weight_zero_points"]
    manifest["files"]["audio_tower.onnx"] = {"sha256": sha256_file(old / "audio_tower.onnx"),
                                             "bytes": (old / "audio_tower.onnx").stat().st_size}  # fmt: skip
    (old / "manifest.json").write_text(json.dumps(manifest))

    mel = audio_to_windows(load_audio(jfk_path), n_mels=80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = OnnxBackend.from_bundle(old, threads=1)
    assert [str(w.message).count("re-export") for w in caught if w.category is ModelWarning] == [1]
    current = OnnxBackend.from_bundle(int8[0], threads=1)
    a, b = current.encode_windows(mel).ravel(), legacy.encode_windows(mel).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.98  # the same integers, up to U8S8 saturation


def test_int8_bundle_runs_on_the_onnx_runtime_backend(int8, fp32, jfk_path):
    backend = OnnxBackend.from_bundle(int8[0], threads=1)
    reference = OnnxBackend.from_bundle(fp32, threads=1)
    assert backend.empty_cache().keys[0].dtype == np.float32  # the KV cache stays float
    mel = audio_to_windows(load_audio(jfk_path), n_mels=80)
    a, b = reference.encode_windows(mel).ravel(), backend.encode_windows(mel).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99
    from fastslm.runtime.generate import Pipeline

    pipe = Pipeline.load(int8[0])
    assert pipe.backend.name == "onnx" and pipe.generate(str(jfk_path), sampling=None).token_ids is not None


def test_int4_export_blocks_and_gates(int4, tmp_path):
    bundle, manifest, _ = int4
    assert {g: e["precision"] for g, e in manifest["graphs"].items()} == {"audio_tower": "int8", "llm": "int4"}
    assert manifest["graphs"]["llm"]["opset"] == 21 and manifest["quantization"]["llm"]["block_size"] == INT4_BLOCK
    gates = rows(manifest)
    assert manifest["quantization"]["gates"]["passed"]
    assert gates["LLM top-1 agreement, INT4 weights"]["value"] >= 0.85
    llm = onnx.load(str(bundle / "llm.onnx"))
    inits = {i.name: i for i in llm.graph.initializer}
    dqs = [n for n in llm.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 15 and all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dqs)
    assert all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": INT4_BLOCK} for n in dqs)
    assert OnnxBackend.from_bundle(bundle).empty_cache().values[1].dtype == np.float32


def test_a_quantized_graphs_external_data_is_as_readable_as_any_new_file(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from fastslm.calibration.qdq import save_graph

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # 16 KB: stored as external data
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 64]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", io[:1], io[1:], [weight]))
    path = tmp_path / "audio_tower.onnx"
    path.with_name("audio_tower.onnx.data").write_bytes(b"old")  # the graph had external data: it keeps that layout
    umask = os.umask(0o022)
    try:
        save_graph(model, path)
    finally:
        os.umask(umask)
    data = path.with_name("audio_tower.onnx.data")
    assert data.stat().st_size >= 64 * 64 * 4 and oct(data.stat().st_mode & 0o777) == oct(0o644)  # onnx makes it 0o600


def test_a_streamed_int8_llm_has_zero_points_onnx_runtime_accepts(tiny, tmp_path):
    # The published-size path: the LLM traced without weights and filled tensor by tensor (export/streamed.py).
    # Without explicit zero points ONNX Runtime's exact int8 kernels refused its per-channel weights at run time.
    import torch

    from fastslm.calibration.build import STREAMED_LLM_MIN_COSINE, check_session
    from fastslm.export.graphs import Tolerance, graph_specs
    from fastslm.export.streamed import fill_weights, reference_outputs, trace_structure, validate_outputs
    from fastslm.models.fastslm import read_config
    from fastslm.models.weights import SafetensorsFolder

    config, store = read_config(tiny), SafetensorsFolder(tiny)
    spec = graph_specs(config)[1]
    structure, path = tmp_path / "llm.structure", tmp_path / "llm.onnx"
    weights = trace_structure(spec, config, structure, torch.float32)
    fill_weights(structure, path, store, config, weights, bits=8)
    expected = reference_outputs(store, config, spec, spec.cases, "float32", bits=8)
    diffs = validate_outputs(spec, path, expected, Tolerance(min_cosine=STREAMED_LLM_MIN_COSINE), "int8",
                             check_session(path, fp16=False))  # fmt: skip
    assert min(d.cosine for d in diffs) >= STREAMED_LLM_MIN_COSINE
    llm = onnx.load(str(path), load_external_data=False)
    dqs = [n for n in llm.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 15 and all(len(n.input) == 3 for n in dqs)  # 7 Linear a layer x 2 layers, and the head


# ---------------------------------------------------------------------------------------------
# Gates that fail, and bad input


def test_a_missed_gate_writes_nothing_unless_overridden(tiny, calib, tmp_path):
    strict = GateThresholds(speech_cosine=0.9999999)
    quick = dict(calibration=calib, sensitivity_windows=0, gate_windows=1, thresholds=strict)
    with pytest.raises(GateError, match=r"accuracy gate failed: speech-token cosine \(1 window\): .* \(limit >= "
                                        r"0.9999999\); nothing was written \(pass --override-gates"):  # fmt: skip
        export(tiny, tmp_path / "strict", "onnx-int8", **quick)
    assert not (tmp_path / "strict").exists()
    manifest = export(tiny, tmp_path / "strict", "onnx-int8", **quick, override_gates=True)
    assert manifest["quantization"]["gates_overridden"] and not manifest["quantization"]["gates"]["passed"]


def test_wer_gate_scores_a_corpus_gate_split_at_the_asked_beam_width(tiny, calib, jfk_path, tmp_path, monkeypatch):
    """--eval-corpus with a gate split: the WER gate scores its utterances (not eval_seen, not jfk.flac)
    and, with --gate-beam 2, decodes them with a beam search of 2, as the table's title says."""
    corpus = tmp_path / "corpus"
    (corpus / "audio" / "gate").mkdir(parents=True)
    jfk, lines = load_audio(jfk_path), []
    for i, (start, end) in enumerate([(0, 4), (5, 9), (2, 7)]):
        rel = f"audio/gate/gate-{i:06d}.flac"
        sf.write(corpus / rel, 0.8 * jfk[start * SAMPLE_RATE : end * SAMPLE_RATE], SAMPLE_RATE)
        lines.append(json.dumps({"id": f"gate-{i:06d}", "text": "and so my fellow americans", "seconds": end - start,
                                 "path": rel}))
    (corpus / "gate.jsonl").write_text("\n".join(lines) + "\n")
    from fastslm.calibration import gates as gates_module

    widths, made = [], gates_module.pipeline_transcriber

    def spy(tokenizer, max_new_tokens=96, beam_size=1):
        widths.append(beam_size)
        return made(tokenizer, max_new_tokens, beam_size)

    monkeypatch.setattr(gates_module, "pipeline_transcriber", spy)
    log: list[str] = []
    manifest = export(tiny, tmp_path / "beam", "onnx-int8", log, calibration=calib, sensitivity_windows=0,
                      gate_windows=1, eval_corpus=corpus, wer_items=2, gate_beam=2, override_gates=True)
    gates = manifest["quantization"]["gates"]
    assert gates["title"].endswith("; WER beam search 2)") and widths and set(widths) == {2}
    assert "gates: FP32 transcripts of 2 utterances" in log  # the first two of the three gate utterances
    wer = [r for r in gates["rows"] if r["gate"].startswith("WER")]
    assert len(wer) == 3 and all("(2 utt.)" in r["gate"] or "on 2 utterances" in r["note"] for r in wer)
    with pytest.raises(OptionError, match="--gate-beam must be a whole number from 1"):
        QuantOptions(gate_beam=0)
    result = runner.invoke(export_app, ["--model", str(tiny), "--out", str(tmp_path / "x"), "--gate-beam", "2"])
    assert result.exit_code == 2 and "--gate-beam applies to the calibrated targets" in result.output


def test_export_cli_refuses_misplaced_or_mismatched_calibration(tiny, calib, jfk_path, tmp_path):
    result = runner.invoke(export_app, ["--model", str(tiny), "--out", str(tmp_path / "a"), "--calibration", str(calib)])
    assert result.exit_code == 2
    assert "--calibration applies to the calibrated targets (onnx-int8, onnx-int4, trt-int8), not onnx" in result.output
    result = runner.invoke(export_app, ["--model", str(tiny), "--out", str(tmp_path / "b"), "--target", "onnx-int8",
                                        "--llm-bits", "4", "--calibration", str(calib)])  # fmt: skip
    assert result.exit_code == 2 and "--llm-bits is fixed by --target onnx-int8" in result.output
    other = tmp_path / "calib128"
    CalibrationSet(audio_to_windows(load_audio(jfk_path), 128), [], model={"name": "large"}).save(other)
    result = runner.invoke(export_app, ["--model", str(tiny), "--out", str(tmp_path / "c"), "--target", "onnx-int4",
                                        "--calibration", str(other)])  # fmt: skip
    assert result.exit_code == 2
    assert "holds 128-bin mel windows (collected for 'large'), this model takes 80" in result.output
    assert not (tmp_path / "c").exists()


def test_calibrate_cli_errors(int8, tiny, recordings, tmp_path):
    silent = tmp_path / "silent"
    silent.mkdir()
    sf.write(silent / "x.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    cases = [
        (["--model", str(int8[0])], "is a 'onnx-int8' bundle whose audio tower is already int8: calibrate the float model"),
        (["--model", str(tmp_path / "nothing")], "does not exist"),
        (["--model", str(recordings)], "is neither a fastslm model folder nor an exported bundle"),
        (["--model", str(tiny), "--audio", str(silent)], "all 1 calibration recording(s) are silent"),
        (["--model", str(tiny), "--audio", str(tmp_path / "none.wav")], "none.wav does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(calibrate_app, [*args, "--out", str(tmp_path / "out"), "--no-progress"])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# trt-int8: the same Q/DQ graphs (fp16 around them) build with TensorRT for RTX on the CPU


@pytest.mark.skipif(not have_tensorrt(), reason="TensorRT is not installed (pip install 'fastslm[trt]')")
@pytest.mark.parametrize("llm_bits", [8, 4])
def test_trt_int8_engines_build_from_the_qdq_graphs(tiny, calib, tmp_path, llm_bits):
    out = tmp_path / "trt"
    result = runner.invoke(export_app, [
        "--model", str(tiny), "--out", str(out), "--target", "trt-int8", "--calibration", str(calib),
        "--llm-bits", str(llm_bits), "--sensitivity-windows", "0", "--gate-windows", "2",
        "--trt-max-windows", "2", "--trt-max-context", "128", "--trt-prefill-chunk", "32",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output[-2000:]
    engines = json.loads((out / "engines.json").read_text())["engines"]
    assert engines["audio_tower"]["precisions"] == ["fp16", "int8"]
    assert engines["llm"]["precisions"] == ["fp16", f"int{llm_bits}"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["llm"]["precision"] == f"int{llm_bits}" and manifest["quantization"]["gates"]["passed"]
    assert manifest["graphs"]["llm"]["inputs"][3]["dtype"] == "float16"  # fp16 around the quantized GEMMs
    # TensorRT accumulates INT8 in int32: its weights use the full range.
    assert max(worst_u8s8_pair_sum(onnx.load(str(out / "audio_tower.onnx"))).values()) == 255 * 2 * INT8_MAX


# ---------------------------------------------------------------------------------------------
# The shipped demo model: the gates, once it exists


@pytest.mark.parametrize("target, llm_wer", [("onnx-int8", 0.5), ("onnx-int4", 2.0)])
@pytest.mark.skipif(not DEFAULT_MODEL_FOLDER.is_dir(), reason="the demo model is not shipped yet (models/demo/shipped/model)")
def test_demo_model_meets_the_quantization_gates(target, llm_wer, tmp_path):
    """Default calibration audio (demo eval audio + jfk.flac) and the WER gate on the eval subset.

    The issue's gates are per stage (INT8 audio tower, INT8 / INT4 LLM weights). The exporter also
    gates the whole bundle at the sum of the two: INT8 passes it; INT8 audio + INT4 LLM measured
    +2.75 pt against its 2.5 (41 utterances, each stage alone +0.50 and +0.00), so that case is
    exported with the override and the composite is only bounded loosely here."""
    int4 = target == "onnx-int4"
    manifest = export(DEFAULT_MODEL_FOLDER, tmp_path / target, target, sensitivity_windows=2, gate_windows=8,
                      wer_items=50, override_gates=int4)  # fmt: skip
    gates = rows(manifest)
    assert manifest["quantization"]["gates"]["passed"] or int4
    assert gates["WER, whole bundle"]["value"] <= (4.0 if int4 else 1.0)
    assert gates["speech-token cosine"]["value"] >= 0.99
    audio_wer = gates["WER, INT8 audio tower + FP32 LLM"]
    llm_row = next(r for name, r in gates.items() if name.startswith("WER, FP32 audio tower"))
    assert audio_wer["passed"] and audio_wer["value"] <= 0.5, audio_wer  # not skipped: the demo model transcribes
    assert llm_row["passed"] and llm_row["value"] <= llm_wer, llm_row


# ---------------------------------------------------------------------------------------------
# Repeatable calibration and the benchmark command


def test_calibrating_the_fp32_bundle_repeats_the_folders_ranges(fp32, calib, recordings, tmp_path):
    """Same windows, same weights: the bundle's graph gives the ranges the model folder gave."""
    out = tmp_path / "from_bundle"
    result = runner.invoke(calibrate_app, ["--model", str(fp32), "--out", str(out), "--audio", str(recordings),
                                           "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    a, b = Ranges.load(calib / RANGES_FILE), Ranges.load(out / RANGES_FILE)
    assert a.fingerprint == b.fingerprint and a.windows_sha256 == b.windows_sha256
    for method in ("minmax", "percentile", "entropy"):
        assert a.amax(method) == pytest.approx(b.amax(method), rel=1e-5)
    np.testing.assert_array_equal(np.load(calib / "windows.npy"), np.load(out / "windows.npy"))


def test_bench_prints_ratios_against_fp32(fp32, int8, capsys):
    from fastslm.calibration.bench import main

    main([str(fp32), str(int8[0]), "--windows", "1", "--tokens", "4", "--repeat", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "audio tower ms/window" in out and "decode tokens/s" in out
    assert len([line for line in out.splitlines() if "onnx-int8" in line and "x)" in line]) == 1


def test_int8_audio_tower_is_validated_on_calibration_windows(tiny, calib, int8, tmp_path, monkeypatch):
    """The sanity check feeds the audio tower real calibration windows (random mel lies outside the calibrated
    ranges and false-alarmed on a trained HFQ-Former), and it still catches a broken graph."""
    from fastslm.calibration.build import make_quantizer
    from fastslm.export import onnx_export
    from fastslm.export.graphs import graph_specs
    from fastslm.export.onnx_export import ExportError
    from fastslm.export.targets import get_target
    from fastslm.models.fastslm import FastSLM

    reference = FastSLM.from_pretrained(tiny)
    quantizer = make_quantizer(get_target("onnx-int8"), QuantOptions(calibration=calib, progress=False), reference,
                               log=lambda line: None)  # fmt: skip
    spec = next(s for s in graph_specs(reference.config) if s.name == "audio_tower")
    windows = np.load(calib / "windows.npy")
    feeds = quantizer.calibration_feeds(spec, 3, seed=1)
    assert len(feeds) == 1 and feeds[0].shape == (3,) + windows.shape[1:]
    np.testing.assert_array_equal(feeds[0], windows[[0, 1, 2]])  # seed 1 x 3 windows, wrapped round 3 windows

    def no_random(*args, **kwargs):
        raise AssertionError("the audio tower was validated on random input")

    monkeypatch.setattr(onnx_export, "sample_inputs", no_random)
    tolerance, diffs = quantizer.validate(spec, spec.wrap(reference), int8[0] / "audio_tower.onnx")
    assert [d.case for d in diffs] == ["1 window", "3 windows"] and min(d.cosine for d in diffs) >= 0.99

    broken = onnx.load(str(int8[0] / "audio_tower.onnx"))
    big = max((i for i in broken.graph.initializer if i.data_type == onnx.TensorProto.INT8),
              key=lambda i: np.prod(i.dims))  # fmt: skip
    values = onnx.numpy_helper.to_array(big)
    big.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(-values), big.name))  # every weight of one layer flipped
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match="the quantized graph is broken"):
        quantizer.validate(spec, spec.wrap(reference), tmp_path / "broken.onnx")


def test_a_missed_audio_gate_keeps_more_layers_float_until_it_passes(tiny, calib, int8, tmp_path):
    """The sensitivity pass's cosine target is a guess; the gate decides how many layers stay float."""
    all_int8 = rows(int8[1])["speech-token cosine"]["value"]  # the fixture's tower, sensitivity target 0.999
    strict = GateThresholds(speech_cosine=round(1.0 - (1.0 - all_int8) / 2, 7))  # half the fixture's error
    log: list[str] = []
    manifest = export(tiny, tmp_path / "escalated", "onnx-int8", log, calibration=calib, target_cosine=0.5,
                      thresholds=strict, gate_windows=1, wer_items=0)  # fmt: skip
    audio = manifest["quantization"]["audio_tower"]
    steps = audio["escalations"]
    counts = [s["float_layers"] for s in steps]
    assert counts and counts == [2**i for i in range(len(counts))]  # 1, 2, 4, ...: twice as many each round
    assert all(s["missed"].startswith("speech-token cosine") for s in steps)
    assert audio["sensitivity"]["keep_float"] == []  # the cosine target alone kept none float
    ranking = [s["layer"] for s in audio["sensitivity"]["most_sensitive"]]
    assert audio["keep_float"][:10] == ranking[: len(audio["keep_float"])]  # most sensitive first
    assert audio["layers_int8"] == len(audio["amax"]) - len(audio["keep_float"])
    assert manifest["quantization"]["gates"]["passed"] and rows(manifest)["speech-token cosine"]["value"] >= strict.speech_cosine
    assert sum("and gating again" in line for line in log) == len(steps)
    # a limit it cannot reach: it stops at max_float_layers and the gate error stands
    with pytest.raises(GateError, match="speech-token cosine"):
        export(tiny, tmp_path / "capped", "onnx-int8", calibration=calib, target_cosine=0.5, max_float_layers=1,
               thresholds=GateThresholds(speech_cosine=0.9999999), gate_windows=1, wer_items=0)  # fmt: skip
    assert not (tmp_path / "capped").exists()
