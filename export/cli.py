"""`fastslm-export`: turn a fastslm model folder into a bundle the torch-free runtime loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import OptionError, reported_in_one_line, run_cli

_Q = "INT8 / INT4 calibration and accuracy gates"
# --flag -> parameter, for refusing calibration flags on targets that do not calibrate.
_QUANT_FLAGS = {
    "--calibration": "calibration", "--calibration-audio": "calibration_audio", "--range-method": "range_method",
    "--percentile": "percentile", "--sensitivity-windows": "sensitivity_windows", "--target-cosine": "target_cosine",
    "--keep-float": "keep_float", "--llm-bits": "llm_bits", "--block-size": "block_size",
    "--llm-keep-float": "llm_keep_float", "--gate-windows": "gate_windows", "--wer-items": "wer_items",
    "--eval-corpus": "eval_corpus", "--gate-beam": "gate_beam", "--override-gates": "override_gates",
}  # fmt: skip
_DEFAULTS = {"range_method": "percentile", "percentile": 99.99, "sensitivity_windows": 4, "target_cosine": 0.999,
             "gate_windows": 16, "wer_items": 50, "gate_beam": 1}  # fmt: skip

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="fastslm model folder (config.json, model.safetensors, tokenizer.json).")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    target: Annotated[str, typer.Option(help="onnx, onnx-fp16w, onnx-fp16, trt-fp16, or calibrated: onnx-int8, onnx-int4, trt-int8.")] = "onnx",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out (only once the new bundle is complete).")] = False,
    decoder_cache: Annotated[Optional[str], typer.Option(help="How the LLM graph keeps its KV cache. in-place: appends to one buffer, no copy per step; loads only in onnxruntime >= 1.32 (CPU wheel). copied: plain past/present, loads in onnxruntime >= 1.20 (onnxruntime-gpu, Jetson) and TensorRT. Default: in-place for the CPU targets onnx, onnx-fp16w, onnx-int8, onnx-int4; copied for onnx-fp16 (the GPU target) and trt-*.", show_default=False)] = None,
    trt_flavour: Annotated[str, typer.Option(help="auto, tensorrt (JetPack / datacenter) or tensorrt_rtx.")] = "auto",
    trt_max_windows: Annotated[Optional[int], typer.Option(help="Audio-tower engine batch limit [default: fitted to the GPU].")] = None,
    trt_max_context: Annotated[Optional[int], typer.Option(help="LLM positions the engine serves [default: 1 h of audio].")] = None,
    trt_prefill_chunk: Annotated[Optional[int], typer.Option(help="Longest prefill chunk in one engine call.")] = None,
    trt_workspace: Annotated[Optional[int], typer.Option(help="Builder workspace limit, MiB.")] = None,
    trt_tactic_memory: Annotated[Optional[int], typer.Option(help="Device memory for tactics, MiB.")] = None,
    trt_opt_level: Annotated[Optional[int], typer.Option(help="Builder optimization level 0..5.")] = None,
    trt_timing_cache: Annotated[Optional[Path], typer.Option(help="Timing cache file to reuse and update.")] = None,
    trt_compute_capability: Annotated[Optional[list[str]], typer.Option(help="TensorRT for RTX targets, e.g. 8.6 (repeatable; 'current').")] = None,
    trt_weight_streaming: Annotated[bool, typer.Option(help="Allow streaming weights under a device-memory budget.")] = False,
    trt_one_llm_profile: Annotated[Optional[bool], typer.Option("--trt-one-llm-profile/--trt-two-llm-profiles", help="LLM engine profiles. One serves prefill and decode: the decoder's weights once in the engine, not once per profile, and about 40% less builder memory per layer (docs/SCALE.md). Default: two where the build fits in the host's available memory, else one.", show_default=False)] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="INT8/INT4: a fastslm-calibrate folder (windows + ranges) (default: collect the default audio now).", rich_help_panel=_Q)] = None,
    calibration_audio: Annotated[Optional[list[Path]], typer.Option(help="INT8/INT4 without --calibration: recordings (files or folders) to calibrate on (repeatable).", rich_help_panel=_Q)] = None,
    range_method: Annotated[str, typer.Option(help="Activation ranges: minmax, percentile or entropy.", rich_help_panel=_Q)] = "percentile",
    percentile: Annotated[float, typer.Option(help="Percentile of |x| for --range-method percentile.", rich_help_panel=_Q)] = 99.99,
    sensitivity_windows: Annotated[int, typer.Option(help="Windows for the per-layer INT8 sensitivity pass (0: skip it).", rich_help_panel=_Q)] = 4,
    target_cosine: Annotated[float, typer.Option(help="Keep the most sensitive audio-tower layers float until its speech tokens reach this cosine.", rich_help_panel=_Q)] = 0.999,
    keep_float: Annotated[Optional[list[str]], typer.Option(help="Audio-tower layer (module path) that stays float (repeatable).", rich_help_panel=_Q)] = None,
    llm_bits: Annotated[Optional[int], typer.Option(help="trt-int8: LLM weights in 8 or 4 bits (default 8).", rich_help_panel=_Q)] = None,
    block_size: Annotated[Optional[int], typer.Option(help="INT4 weights: rows per scale along the input dimension [default: 128, TensorRT-LLM's group size; 32 is more exact and decodes slower].", rich_help_panel=_Q, show_default=False)] = None,
    llm_keep_float: Annotated[Optional[list[str]], typer.Option(help="LLM layer (e.g. llm.lm_head) that keeps float weights (repeatable).", rich_help_panel=_Q)] = None,
    gate_windows: Annotated[int, typer.Option(help="Calibration windows the cosine and top-1 gates run on.", rich_help_panel=_Q)] = 16,
    wer_items: Annotated[int, typer.Option(help="Utterances of --eval-corpus the WER gate scores (0: off).", rich_help_panel=_Q)] = 50,
    eval_corpus: Annotated[Optional[Path], typer.Option(help="Corpus folder for the WER gate: its gate.jsonl, else its eval_seen.jsonl [default: the shipped demo eval subset].", rich_help_panel=_Q)] = None,
    gate_beam: Annotated[int, typer.Option(help="Beam width the WER gate decodes with (1: greedy); a bundle run with a beam search is best gated at that width.", rich_help_panel=_Q)] = 1,
    override_gates: Annotated[bool, typer.Option(help="Write the bundle even when it misses an accuracy gate.", rich_help_panel=_Q)] = False,
) -> None:
    with reported_in_one_line("fastslm-export", "interrupted; nothing was written"):
        # Heavy imports (torch, onnx) only after typer has parsed the arguments, so --help is instant.
        from .bundle_writer import ExportOptions, export_bundle
        from .targets import get_target

        chosen = get_target(target)  # an unknown target fails before the model is loaded
        trt_options, trt_limits = None, {}
        if chosen.runtime == "tensorrt":
            from .tensorrt_build import BuildOptions

            trt_options = BuildOptions(
                flavour=trt_flavour,
                workspace_mib=trt_workspace,
                tactic_dram_mib=trt_tactic_memory,
                optimization_level=trt_opt_level,
                timing_cache=trt_timing_cache,
                compute_capabilities=tuple(trt_compute_capability or ()),
                weight_streaming=trt_weight_streaming,
            )
            trt_limits = {"max_windows": trt_max_windows, "max_context": trt_max_context, "prefill_chunk": trt_prefill_chunk,
                          "one_llm_profile": trt_one_llm_profile}
        quantization = None
        if chosen.quantizer is not None:
            from ..calibration.build import QuantOptions

            quantization = QuantOptions(
                calibration=calibration,
                audio=tuple(calibration_audio) if calibration_audio else None,
                method=range_method,
                percentile=percentile,
                sensitivity_windows=sensitivity_windows,
                target_cosine=target_cosine,
                keep_float=tuple(keep_float or ()),
                llm_bits=llm_bits,
                **({"block_size": block_size} if block_size is not None else {}),
                llm_keep_float=tuple(llm_keep_float or ()),
                gate_windows=gate_windows,
                wer_items=wer_items,
                eval_corpus=eval_corpus,
                gate_beam=gate_beam,
                override_gates=override_gates,
            )
        else:
            values = {"calibration": calibration, "calibration_audio": calibration_audio, "range_method": range_method,
                      "percentile": percentile, "sensitivity_windows": sensitivity_windows,
                      "target_cosine": target_cosine, "keep_float": keep_float, "llm_bits": llm_bits,
                      "block_size": block_size, "llm_keep_float": llm_keep_float, "gate_windows": gate_windows,
                      "wer_items": wer_items, "eval_corpus": eval_corpus, "gate_beam": gate_beam,
                      "override_gates": override_gates}  # fmt: skip
            given = [flag for flag, name in _QUANT_FLAGS.items() if values[name] not in (None, False, _DEFAULTS.get(name))]
            if given:
                raise OptionError(f"{given[0]} applies to the calibrated targets (onnx-int8, onnx-int4, trt-int8), not {target}")
        export_bundle(
            ExportOptions(model=model, out=out, target=target, force=force, trt=trt_options, trt_limits=trt_limits,
                          quantization=quantization, decoder_cache=decoder_cache)
        )


def main() -> None:
    run_cli(app, "fastslm-export")


if __name__ == "__main__":
    main()
