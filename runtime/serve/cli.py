"""`fastslm-serve`: the OpenAI-compatible server on this machine (loopback unless told otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OptionError, reported_in_one_line, run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(help="Exported bundle or model folder [default: shipped demo].")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require `Authorization: Bearer KEY` on /v1 requests [default: $FASTSLM_API_KEY, else none].")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx, tensorrt or torch.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (as fastslm-run), fp32, fp16, int8 or int4.")] = "auto",
    providers: Annotated[Optional[str], typer.Option(help="onnx backend: execution providers in order.")] = None,
    workers: Annotated[int, typer.Option(help="Generations at once (one already uses every CPU core).")] = 1,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait; one more gets 429.")] = 32,
    max_audio_mb: Annotated[float, typer.Option(help="Largest recording accepted, in MiB.")] = 25.0,
    max_audio_seconds: Annotated[float, typer.Option(help="Longest recording accepted.")] = 1800.0,
    max_new_tokens: Annotated[int, typer.Option(help="Default and largest max_tokens of a request.")] = 512,
    prefix_cache_mb: Annotated[float, typer.Option(
        help="MiB of encoded recordings (speech tokens, audio-prefix KV caches) kept for the next question; 0 keeps none.")] = 1024.0,
    ray: Annotated[bool, typer.Option("--ray", help="Serve on Ray Serve (joins RAY_ADDRESS or a `ray start` cluster, "
                                      "else starts one here); needs fastslm[ray].")] = False,
    min_replicas: Annotated[int, typer.Option(help="--ray: fewest replicas the autoscaler keeps.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="--ray: most replicas the autoscaler starts.")] = 1,
    cpus_per_replica: Annotated[float, typer.Option(help="--ray: CPUs reserved per replica (its ONNX Runtime threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="--ray: GPUs per replica.")] = 0.0,
) -> None:
    with reported_in_one_line("fastslm-serve"):
        from .options import ServeOptions

        if not (max_audio_mb > 0):
            raise OptionError(f"max-audio-mb {max_audio_mb} is invalid: use a positive number")
        options = ServeOptions(
            host=host, port=port, api_key=api_key or os.environ.get("FASTSLM_API_KEY") or None,
            max_audio_bytes=int(max_audio_mb * 2**20), max_audio_seconds=max_audio_seconds, queue_size=queue_size,
            workers=workers, prefix_cache_mb=prefix_cache_mb, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        if ray:
            run_on_ray(options, model, backend, precision, providers, min_replicas, max_replicas, cpus_per_replica,
                       gpus_per_replica)  # fmt: skip
        else:
            run_server(options, model, backend, precision, providers)


def run_server(options, model, backend: str = "auto", precision: str = "auto", providers: str | None = None) -> None:
    import uvicorn

    from ..generate import Pipeline
    from .app import create_app
    from .engine import Engine

    with Pipeline.load(model, backend, precision, providers=providers) as pipe:  # TensorRT saves its cache on close
        warn_if_exposed(options)
        typer.echo(f"fastslm-serve: model {pipe.model_name} on {pipe.variant}, "
                   f"OpenAI API at http://{options.host}:{options.port}/v1", err=True)  # fmt: skip
        uvicorn.run(create_app(Engine(pipe, options)), host=options.host, port=options.port, log_level="warning",
                    timeout_graceful_shutdown=5)  # fmt: skip


def run_on_ray(options, model, backend, precision, providers, min_replicas, max_replicas, cpus, gpus) -> None:
    from .ray_app import ReplicaOptions, run  # without Ray: one line naming fastslm[ray] (runtime.errors)
    replicas = ReplicaOptions(min_replicas, max_replicas, cpus, gpus)
    if model is not None:
        model = model.absolute()  # replicas may run in another working directory
    warn_if_exposed(options)
    typer.echo(f"fastslm-serve: deploying {min_replicas}-{max_replicas} replicas on Ray Serve, "
               f"OpenAI API at http://{options.host}:{options.port}/v1 (Ctrl-C stops it)", err=True)  # fmt: skip
    run(model, options, replicas, backend, precision, providers, blocking=True)


def warn_if_exposed(options) -> None:
    if not options.loopback and not options.api_key:
        typer.echo(f"fastslm-serve: warning: {options.host} is reachable from the network and no --api-key is set; "
                   "anyone who can reach this port can use the model", err=True)  # fmt: skip


def main() -> None:
    run_cli(app, "fastslm-serve")


if __name__ == "__main__":
    main()
