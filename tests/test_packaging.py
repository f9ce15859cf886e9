"""Packaging: base dependencies as ranges and only where used, exclusive ONNX Runtime builds, a
one-line "install fastslm[...]" for a missing extra, and no default path outside the package."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# distribution -> the module it installs
MODULE_OF = {"numpy": "numpy", "soundfile": "soundfile", "soxr": "soxr", "tokenizers": "tokenizers",
             "typer": "typer", "tqdm": "tqdm", "onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime",
             "safetensors": "safetensors", "polygraphy": "polygraphy"}  # fmt: skip


def _name(spec: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()


def _imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_base_dependencies_are_ranges_used_by_the_runtime():
    base = PROJECT["dependencies"]
    assert all("==" not in spec and ">=" in spec and "<" in spec for spec in base), base
    runtime_imports = _imports(REPO / "runtime")
    for spec in base:
        assert MODULE_OF[_name(spec)] in runtime_imports, f"{spec} is a base dependency the runtime never imports"
    # The VAD model ships inside the package (runtime/assets), so faster-whisper is only the bench's peer.
    assert "faster-whisper" not in {_name(s) for s in base}
    assert "faster-whisper" in {_name(s) for s in PROJECT["optional-dependencies"]["bench"]}
    import hashlib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "assets/*" in package_data["fastslm.runtime"]
    vad = (REPO / "runtime" / "assets" / "silero_vad_v6.onnx").read_bytes()
    assert hashlib.sha256(vad).hexdigest() in (REPO / "runtime" / "assets" / "SILERO_VAD.md").read_text()
    assert "safetensors" not in {_name(s) for s in base}  # only the PyTorch side (models/) reads safetensors


def test_onnxruntime_builds_are_exclusive_extras():
    extras = PROJECT["optional-dependencies"]
    base = {_name(s) for s in PROJECT["dependencies"]}
    assert "onnxruntime" not in base and "onnxruntime-gpu" not in base
    assert [_name(s) for s in extras["cpu"]] == ["onnxruntime"]
    assert [_name(s) for s in extras["gpu"]] == ["onnxruntime-gpu"]
    for name, specs in extras.items():  # no extra pulls in both builds
        names = {_name(s) for s in specs} | {m for s in specs for m in re.findall(r"fastslm\[(\w+)\]", s)}
        assert not {"cpu", "gpu"} <= names and not {"onnxruntime", "onnxruntime-gpu"} <= names, name
    readme = (REPO / "README.md").read_text()
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in readme


def test_test_only_tools_sit_in_dev():
    extras = PROJECT["optional-dependencies"]
    assert "polygraphy" not in {_name(s) for s in extras["trt"]}
    assert {"polygraphy", "hypothesis"} <= {_name(s) for s in extras["dev"]}
    assert "polygraphy" not in _imports(REPO / "runtime") | _imports(REPO / "export")


@pytest.mark.parametrize(
    "module, tool, blocked, extra, args",
    [
        ("fastslm.export.cli", "fastslm-export", "torch", "export", ["--model", "{tmp}", "--out", "{tmp}/o"]),
        ("fastslm.models.convert", "fastslm-convert", "torch", "export",
         ["--checkpoint", "{tmp}/c.pt", "--qwen", "{tmp}", "--out", "{tmp}/o"]),
        ("fastslm.calibration.cli", "fastslm-calibrate", "onnx", "export", ["--model", "{tmp}", "--out", "{tmp}/o"]),
        ("fastslm.runtime.cli", "fastslm-run", "onnxruntime", "cpu", ["{tmp}/a.wav"]),  # the default (ONNX) model
        ("fastslm.runtime.serve.cli", "fastslm-serve", "uvicorn", "serve", []),
        ("fastslm.runtime.serve.cli", "fastslm-serve", "ray", "ray", ["--ray"]),
    ],
)
def test_a_missing_extra_is_one_line(tmp_path, module, tool, blocked, extra, args):
    """As in a base install: the module is absent, so the command names the extra to install."""
    argv = [tool] + [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = f"import sys\nsys.modules[{blocked!r}] = None\nsys.argv = {argv!r}\nfrom {module} import main\nmain()\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    how = '"fastslm[cpu]" (or "fastslm[gpu]" for CUDA)' if extra == "cpu" else f'"fastslm[{extra}]"'
    assert lines == [f"{tool}: error: this needs {blocked}, which is not installed: pip install {how}"], result.stderr
    assert not (tmp_path / "o").exists()


def test_installed_defaults_look_nowhere_outside_the_package(monkeypatch):
    from fastslm.calibration import data, evaluation
    from fastslm.runtime import loading

    monkeypatch.delenv("FASTSLM_SHARED_DATA", raising=False)
    monkeypatch.delenv("FASTSLM_CORPUS", raising=False)
    package = Path(loading.__file__).resolve().parents[1]
    assert evaluation.shared_data() is None and evaluation.jfk_utterance() is None
    for path in data.default_audio() + [data.default_corpus(), loading.DEFAULT_MODEL_DIR, loading.DEMO_EVAL_SUBSET]:
        assert Path(path).resolve().is_relative_to(package), path
    # The package's own folders only: a checkout's root also holds .venv/ and work/.
    source = "\n".join(p.read_text() for d in ("runtime", "export", "calibration", "models")
                       for p in (package / d).rglob("*.py"))
    assert '"shared"' not in source and "parents[2]" not in source


def _relative_imports(path: Path) -> set[str]:
    """Modules a file imports relative to its package, as dotted paths under fastslm."""
    package = ["fastslm", *path.relative_to(REPO).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_product_code_imports_no_demo_and_calibration_no_exporter_names():
    """The gates score with calibration/evaluation.py, not the demo recipe; bundle names live in
    runtime/bundle.py, so calibration no longer reaches into export/bundle_writer.py (the old cycle)."""
    for path in (REPO / "calibration").glob("*.py"):
        imports = _relative_imports(path)
        assert not any(m.startswith("fastslm.models.demo") for m in imports), path
        assert "fastslm.export.bundle_writer" not in imports, path
