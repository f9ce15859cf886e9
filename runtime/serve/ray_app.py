"""Scale-out on Ray Serve: the same FastAPI app and Engine in each replica, replicas autoscaled.

    fastslm-serve --ray --model BUNDLE --min-replicas 1 --max-replicas 4     # local or existing cluster
    serve run fastslm.runtime.serve.ray_app:build model=BUNDLE max_replicas=4  # Ray's own CLI, same app

Ray's HTTP proxy takes the requests and routes each to a replica with room; each replica is a
Ray actor holding one Pipeline and the Engine of `fastslm-serve` (its bounded queue, prefix
cache and OpenAI error shapes), so a request gets the same answer from one box or a cluster.
`ray.init()` joins the cluster named by RAY_ADDRESS or started here with `ray start`, else it
starts a single-node one; nothing in the deployment names a node, so it runs unchanged on more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ray import serve

from ..errors import OptionError
from .options import ServeOptions


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas and what each holds: Ray's autoscaler moves between min and max."""

    min_replicas: int = 1
    max_replicas: int = 1
    cpus: float = 1.0  # Ray CPUs reserved per replica; ONNX Runtime gets as many threads
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.min_replicas, bool) or not isinstance(self.min_replicas, int) or self.min_replicas < 0:
            raise OptionError(f"min-replicas {self.min_replicas!r} is invalid: use a whole number >= 0")
        if not isinstance(self.max_replicas, int) or self.max_replicas < max(1, self.min_replicas):
            raise OptionError(f"max-replicas {self.max_replicas!r} is invalid: use a whole number >= min-replicas and >= 1")
        if not self.cpus > 0 or not self.gpus >= 0:
            raise OptionError(f"cpus {self.cpus!r} / gpus {self.gpus!r} per replica are invalid: cpus > 0, gpus >= 0")

    def deployment_options(self, serve_options: ServeOptions) -> dict:
        per_replica = serve_options.workers + serve_options.queue_size
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                # a replica runs `workers` generations at once; more waiting than that means scale up
                "target_ongoing_requests": 2 * serve_options.workers,
            },
            # beyond this a replica's own queue would answer 429; Ray keeps the rest at the proxy
            "max_ongoing_requests": per_replica,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
        }


@serve.ingress()
class FastSLMReplica:
    """One replica: loads the model once, then serves `runtime.serve.app` from it."""

    def __init__(self, model: str | None, backend: str, precision: str, providers: str | None, options: ServeOptions,
                 threads: int):  # fmt: skip
        from ..generate import Pipeline
        from .engine import Engine

        self.engine = Engine(Pipeline.load(model, backend, precision, providers=providers, threads=threads), options)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.engine)


def application(model: str | Path | None, options: ServeOptions, replicas: ReplicaOptions, backend: str = "auto",
                precision: str = "auto", providers: str | None = None) -> serve.Application:  # fmt: skip
    """The bound Ray Serve application (pass it to serve.run)."""
    deployment = serve.deployment(FastSLMReplica, name="fastslm").options(**replicas.deployment_options(options))
    threads = max(1, int(replicas.cpus))
    return deployment.bind(str(model) if model is not None else None, backend, precision, providers, options, threads)


def build(args: dict) -> serve.Application:
    """For `serve run fastslm.runtime.serve.ray_app:build model=... max_replicas=...` and Serve config files."""
    args = dict(args)
    model = args.pop("model", None)
    backend = args.pop("backend", "auto")
    precision = args.pop("precision", "auto")
    providers = args.pop("providers", None)
    replica_fields = {k: args.pop(k) for k in list(args) if k in ReplicaOptions.__dataclass_fields__}
    replicas = ReplicaOptions(**{k: (float(v) if k in ("cpus", "gpus") else int(v)) for k, v in replica_fields.items()})
    serve_fields = ServeOptions.__dataclass_fields__
    unknown = sorted(set(args) - set(serve_fields))
    if unknown:
        raise OptionError(f"unknown argument(s) {', '.join(unknown)}: use model, backend, precision, providers, "
                          f"{', '.join(ReplicaOptions.__dataclass_fields__)} or {', '.join(serve_fields)}")  # fmt: skip
    defaults = asdict(ServeOptions())
    typed = {k: type(defaults[k])(v) if defaults[k] is not None else v for k, v in args.items()}
    return application(model, ServeOptions(**typed), replicas, backend, precision, providers)


def join_or_start_ray() -> None:
    """Join the cluster of RAY_ADDRESS or of `ray start` on this machine, else start a local one."""
    import ray

    if not ray.is_initialized():
        # a cluster of our own needs no dashboard; one started by `ray start` keeps its own
        ray.init(log_to_driver=False, include_dashboard=False)


def run(model: str | Path | None, options: ServeOptions, replicas: ReplicaOptions, backend: str = "auto",
        precision: str = "auto", providers: str | None = None, blocking: bool = True) -> str:  # fmt: skip
    """Start (or join) Ray, put Serve's HTTP proxy on options.host:port and deploy; returns the base URL."""
    join_or_start_ray()
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(application(model, options, replicas, backend, precision, providers), name="fastslm", route_prefix="/",
              blocking=blocking)  # fmt: skip
    return f"http://{options.host}:{options.port}"
