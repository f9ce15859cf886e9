"""Find a model (folder or exported bundle) and open it with the right backend."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .bundle import CONFIG_FILE, MANIFEST_FILE, MODEL_FORMAT, TOKENIZER_FILE, WEIGHTS_FILE, read_manifest, sha256_file
from .errors import ModelFileError, OptionError
from .generate import Pipeline
from .sampling import SamplingOptions
from .tokenizer import Tokenizer

BACKENDS = ("auto", "torch", "onnx", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "int8", "int4")

# The shipped English demo model (see models/demo/), found relative to the installed package:
# its model folder (for the PyTorch reference and re-export) and its ONNX bundle, the default.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "demo" / "shipped"
DEFAULT_MODEL_FOLDER = SHIPPED_DIR / "model"
DEFAULT_MODEL_DIR = SHIPPED_DIR / "onnx"
# The slice of the demo model's held-out sets shipped with it (models/demo/eval_subset/README.md).
DEMO_EVAL_SUBSET = SHIPPED_DIR.parent / "eval_subset"
DEMO_CALIBRATION = SHIPPED_DIR.parent / "calibration"  # INT8 calibration audio, disjoint from the eval subset
DEFAULT_MODEL_NOTE = "the default is a small English demo model; pass --model for a real FastSLM"


def model_kind(path: Path) -> str:
    """'bundle' for an exported bundle (manifest.json), 'folder' for a fastslm model folder."""
    if (path / MANIFEST_FILE).is_file():
        return "bundle"
    if any(path.glob("*.onnx")) and not (path / WEIGHTS_FILE).is_file():
        raise ModelFileError(
            f"{path} looks like an exported bundle but has no manifest.json; copy the bundle again or re-export it"
        )
    config = path / CONFIG_FILE
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
                return "folder"
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFileError(f"{config} is not valid JSON; re-create the model folder") from None
    raise ModelFileError(
        f"{path} is neither a fastslm model folder nor an exported bundle; "
        "make one with `fastslm-convert` or `fastslm-export`"
    )


def resolve_model_path(model: str | Path | None) -> Path:
    path = Path(model) if model is not None else DEFAULT_MODEL_DIR
    if not path.exists():
        if model is None:
            raise ModelFileError(f"the default model is missing from {path}; reinstall fastslm or pass --model")
        raise ModelFileError(f"model {path} does not exist; pass a model folder or exported bundle")
    if not path.is_dir():
        raise ModelFileError(f"model {path} is a file; pass the folder that holds it")
    return path


def shipped_bundles() -> dict[str, Path]:
    """Precision -> bundle, for the bundles shipped beside the demo model (the default first)."""
    found = {}
    for path in [DEFAULT_MODEL_DIR, *sorted(SHIPPED_DIR.glob("onnx-*"))]:
        if (path / MANIFEST_FILE).is_file():
            found.setdefault(read_manifest(path).get("precision", "fp32"), path)
    return found


def resolve_precision(model: str | Path | None, precision: str, backend: str) -> str | Path | None:
    """The model to open for `precision`: the shipped bundle of that precision, or `model` if it has it.

    "auto" keeps the default: the shipped bundle is the variant measured fastest on a CPU among
    those that pass the accuracy gates (docs/BENCHMARKS.md).
    """
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto" or backend == "torch":
        return model
    if model is None:
        shipped = shipped_bundles()
        if precision in shipped:
            return shipped[precision]
        target = "onnx" if precision == "fp32" else f"onnx-{precision}"
        raise OptionError(
            f"the demo model ships as {', '.join(shipped) or 'no bundle'}, not {precision}; make one with "
            f"`fastslm-export --model {DEFAULT_MODEL_FOLDER} --target {target} --out DIR` and pass --model DIR"
        )
    path = resolve_model_path(model)
    if model_kind(path) == "bundle":
        have = read_manifest(path).get("precision", "fp32")
        if have != precision:
            raise OptionError(f"{path} is a {have} bundle, not {precision}; pass a bundle exported for {precision} or drop --precision")
    return model


def _check_options(backend: str, options: dict, accepted: tuple[str, ...]) -> None:
    """A backend option another backend takes (--providers with tensorrt) is one line, not a TypeError."""
    wrong = sorted(set(options) - set(accepted))
    if wrong:
        raise OptionError(
            f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to the {backend} backend "
            f"(it takes {', '.join(accepted)}); drop {'it' if len(wrong) == 1 else 'them'} or choose another --backend"
        )


def load_pipeline(model: str | Path | None = None, backend: str = "auto", precision: str = "auto", **options) -> Pipeline:
    """Open a model folder (torch backend) or an exported bundle (onnx backend).

    `precision` picks the variant: a shipped or given bundle of that precision, or the dtype
    the PyTorch reference computes in (fp32, fp16). `options` go to the backend:
    max_windows_per_batch and threads for both; providers and verify (sha256 of every bundle
    file, default True) for onnx. None values mean "default".
    """
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    options = {k: v for k, v in options.items() if v is not None}
    model = resolve_precision(model, precision, backend)
    path = resolve_model_path(model)
    kind = model_kind(path)
    if backend == "auto":
        # A bundle names the runtime it was exported for (onnx now; tensorrt with its engines).
        backend = read_manifest(path).get("runtime", "onnx") if kind == "bundle" else "torch"
        if backend not in BACKENDS:
            raise OptionError(f"{path} is a bundle for the {backend!r} runtime, which this fastslm does not have; upgrade it")
    if backend == "torch":
        if kind != "folder":
            raise OptionError(f"--backend torch needs a model folder, {path} is an exported bundle; use --backend onnx")
        _check_options("torch", options, ("max_windows_per_batch", "threads"))
        try:
            from ..models.torch_backend import TorchBackend
        except ImportError:
            raise OptionError("the torch backend needs PyTorch: pip install 'fastslm[export]', or use an exported bundle") from None
        if precision not in ("auto", "fp32", "fp16"):
            raise OptionError(f"the torch backend computes in fp32 or fp16, not {precision}; use an exported {precision} bundle")
        engine = TorchBackend.from_folder(path, dtype=precision, **options)
        config = json.loads((path / CONFIG_FILE).read_text())  # valid: the backend has just loaded it
        name = config.get("name", path.name)
        tokenizer_path = path / TOKENIZER_FILE
        # Hashing the weights waits until a cache needs it; the compute dtype changes the KV values too.
        identity = lambda: f"{folder_identity(path)}:{engine.precision}"  # noqa: E731
    elif backend == "tensorrt":
        _check_options("tensorrt", options, ("verify", "device_index", "max_windows_per_batch", "runtime_cache",
                                             "weight_budget_mib"))  # fmt: skip
        if kind != "bundle":
            raise OptionError(
                f"--backend tensorrt needs a bundle with engines, {path} is a model folder; "
                f"make one with `fastslm-export --model {path} --target trt-fp16 --out BUNDLE`"
            )
        from .trt_backend import TrtBackend

        engine = TrtBackend.from_bundle(path, **options)
        name, config = engine.bundle.model_name, engine.bundle.config
        tokenizer_path = engine.bundle.tokenizer_path
        identity = bundle_identity(engine.bundle.manifest)
    else:  # onnx
        _check_options("onnx", options, ("verify", "providers", "max_windows_per_batch", "threads"))
        if kind != "bundle":
            raise OptionError(
                f"--backend onnx needs an exported bundle, {path} is a model folder; "
                f"make one with `fastslm-export --model {path} --out BUNDLE`"
            )
        from .onnx_backend import OnnxBackend

        engine = OnnxBackend.from_bundle(path, **options)
        name, config = engine.bundle.model_name, engine.bundle.config
        tokenizer_path = engine.bundle.tokenizer_path
        identity = bundle_identity(engine.bundle.manifest)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    bundle = getattr(engine, "bundle", None)
    if bundle is not None and tokenizer.vocab_size > bundle.dims.vocab_size:
        raise ModelFileError(
            f"{tokenizer_path} has {tokenizer.vocab_size} tokens, more than the model's {bundle.dims.vocab_size} "
            "embeddings: the tokenizer comes from another model; re-export the bundle"
        )
    sampling = SamplingOptions.from_config(config, path / CONFIG_FILE)
    return Pipeline(engine, tokenizer, model_name=name, identity=identity, sampling=sampling)


def bundle_identity(manifest: dict) -> str:
    """A bundle's identity for saved caches: the sha256 of every file it holds (verified when it loads)."""
    files = json.dumps(manifest["files"], sort_keys=True).encode()
    return f"bundle:{manifest['model']['name']}:{manifest.get('target')}:{hashlib.sha256(files).hexdigest()}"


def folder_identity(folder: Path) -> str:
    """A model folder's identity for saved caches: the sha256 of its config, weights and tokenizer."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        digest.update(sha256_file(folder / name).encode())
    return f"folder:{digest.hexdigest()}"
