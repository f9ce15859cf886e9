"""`fastslm-export`: turn a fastslm model folder into a bundle the torch-free runtime loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import FastSLMError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="fastslm model folder (config.json, model.safetensors, tokenizer.json).")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    target: Annotated[str, typer.Option(help="onnx, onnx-fp16 or trt-fp16.")] = "onnx",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out (only once the new bundle is complete).")] = False,
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
) -> None:
    try:
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
            trt_limits = {"max_windows": trt_max_windows, "max_context": trt_max_context, "prefill_chunk": trt_prefill_chunk}
        export_bundle(
            ExportOptions(model=model, out=out, target=target, force=force, trt=trt_options, trt_limits=trt_limits)
        )
    except FastSLMError as exc:
        typer.echo(f"fastslm-export: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("fastslm-export: error: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
