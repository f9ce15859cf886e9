"""Find a model (folder or exported bundle) and open it with the right backend."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFileError, OptionError
from .generate import Pipeline
from .tokenizer import Tokenizer

BACKENDS = ("auto", "torch", "onnx")

# The shipped English demo model (see models/demo/); found relative to the installed package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo" / "shipped"
DEFAULT_MODEL_NOTE = "the default is a small English demo model; pass --model for a real FastSLM"


def model_kind(path: Path) -> str:
    """'bundle' for an exported bundle (manifest.json), 'folder' for a fastslm model folder."""
    if (path / "manifest.json").is_file():
        return "bundle"
    config = path / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get("format") == "fastslm-model":
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


def load_pipeline(model: str | Path | None = None, backend: str = "auto", **options) -> Pipeline:
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = resolve_model_path(model)
    kind = model_kind(path)
    if backend == "auto":
        backend = "onnx" if kind == "bundle" else "torch"
    if backend == "torch":
        if kind != "folder":
            raise OptionError(f"--backend torch needs a model folder, {path} is an exported bundle; use --backend onnx")
        try:
            from ..models.torch_backend import TorchBackend
        except ImportError:
            raise OptionError("the torch backend needs PyTorch: pip install 'fastslm[export]', or use an exported bundle") from None
        engine = TorchBackend.from_folder(path, **options)
        name = json.loads((path / "config.json").read_text()).get("name", path.name)
    else:
        raise OptionError(f"backend {backend!r} is not available for {path}")
    return Pipeline(engine, Tokenizer.from_file(path / "tokenizer.json"), model_name=name)
