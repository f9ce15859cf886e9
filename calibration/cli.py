"""`fastslm-calibrate`: collect calibration windows from real audio and measure the audio tower's ranges.

    fastslm-calibrate --model DIR|BUNDLE [--audio PATH ...] --out CALIB
    fastslm-export --model DIR --target onnx-int8 --calibration CALIB --out BUNDLE

The windows are cut exactly as the runtime cuts them (runtime.audio.audio_to_windows); CALIB
keeps them (windows.npy) and the activation histograms of every INT8 layer (ranges.json, all
three range methods), so exports from the same model repeat the same quantization.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import OptionError, reported_in_one_line, run_cli
from ..runtime.output_folder import OutputFolder

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def describe_model(model: Path) -> dict:
    """{"name", "n_mels", "source", "kind"} of a model folder or a float bundle (no weights are read)."""
    from ..runtime.bundle import AUDIO_TOWER, CONFIG_FILE, ModelDims, load_bundle
    from ..runtime.loading import model_kind, resolve_model_path
    from .data import CalibrationError

    path = resolve_model_path(model)
    kind = model_kind(path)
    if kind == "bundle":
        bundle = load_bundle(path, verify=False)
        precision = bundle.graph(AUDIO_TOWER).get("precision", bundle.precision)
        if precision not in ("fp32", "fp16"):
            raise CalibrationError(
                f"{path} is a {bundle.manifest.get('target')!r} bundle whose audio tower is already {precision}: calibrate "
                "the float model (its folder, or a bundle exported with --target onnx)"
            )
        dims = bundle.dims
    else:
        dims = ModelDims.from_config(json.loads((path / CONFIG_FILE).read_text()), path / CONFIG_FILE)
    return {"name": dims.name, "n_mels": dims.n_mels, "source": str(path), "kind": kind}


def audio_tower_graph(model: dict, workdir: Path) -> Path:
    """The float audio-tower graph: the bundle's own, or the model folder's exported in fp32 to `workdir`."""
    from ..runtime.bundle import AUDIO_TOWER, load_bundle

    if model["kind"] == "bundle":
        return load_bundle(model["source"], verify=False).graph_path(AUDIO_TOWER)
    try:
        import torch

        from ..export.graphs import audio_tower_spec
        from ..export.onnx_export import export_graph
        from ..models.fastslm import FastSLM
    except ImportError:
        raise OptionError("calibrating a model folder needs PyTorch (pip install 'fastslm[export]'), or pass an exported "
                          "fp32 bundle") from None  # fmt: skip
    reference = FastSLM.from_pretrained(model["source"])
    spec = audio_tower_spec(reference.config)
    graph = workdir / spec.file
    typer.echo("fastslm-calibrate: exporting the fp32 audio tower to measure its ranges", err=True)
    export_graph(spec, spec.wrap(reference), graph, dtype=torch.float32)
    return graph


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="fastslm model folder or a float (onnx / onnx-fp16) bundle.")],
    out: Annotated[Path, typer.Option(help="Calibration folder to write (windows.npy, ranges.json, calibration.json).")],
    audio: Annotated[Optional[list[Path]], typer.Option(help="Recordings: files or folders (repeatable). Default: the demo recipe's calibration audio (models/demo/calibration), never the gates' eval audio.")] = None,
    max_windows: Annotated[int, typer.Option(help="Keep at most this many 30 s windows, spread over the recordings.")] = 64,
    percentile: Annotated[float, typer.Option(help="Percentile recorded with the ranges (exports may choose another).")] = 99.99,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal).")] = None,
) -> None:
    with reported_in_one_line("fastslm-calibrate", "interrupted; nothing was written"):
        from .data import collect
        from .ranges import METHODS, RANGES_FILE, collect_ranges

        with OutputFolder(out, force, protect=[model]) as output:
            who = describe_model(model)
            data = collect(audio, who["n_mels"], max_windows=max_windows, progress=progress,
                           model={"name": who["name"], "source": who["source"]})  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="fastslm-calibrate-") as tmp:
                graph_path = audio_tower_graph(who, Path(tmp))
                import onnx

                ranges = collect_ranges(onnx.load(str(graph_path)), data.windows, windows_sha256=data.sha256,
                                        percentile=percentile, progress=progress)  # fmt: skip
            data.save(output.path)
            ranges.save(output.path / RANGES_FILE)
            output.publish()
        silent = f", {len(data.skipped)} silent skipped" if data.skipped else ""
        typer.echo(f"fastslm-calibrate: {len(data.windows)} windows from {len(data.sources)} recordings{silent} "
                   f"-> {out / 'windows.npy'}", err=True)  # fmt: skip
        amax = {m: ranges.amax(m) for m in METHODS}
        keys = list(amax["minmax"])
        typer.echo(f"fastslm-calibrate: ranges of {len(keys)} layers ({', '.join(METHODS)}) -> {out / RANGES_FILE}", err=True)
        for key in keys[:3]:
            typer.echo(f"  {key}: " + ", ".join(f"{m} {amax[m][key]:.3g}" for m in METHODS), err=True)
        if len(keys) > 3:
            typer.echo(f"  ... ({len(keys) - 3} more)", err=True)


def main() -> None:
    run_cli(app, "fastslm-calibrate")


if __name__ == "__main__":
    main()
