from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTSLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# The product never guesses where shared data lies (an installed fastslm looks nowhere outside
# itself); the test checkout names it, for the calibration defaults and the WER gate's jfk.flac.
os.environ.setdefault("FASTSLM_SHARED_DATA", str(SHARED_DATA))
JFK_TRANSCRIPT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    path = SHARED_DATA / "jfk.flac"
    if not path.exists():
        pytest.fail(f"test audio {path} is missing: set FASTSLM_SHARED_DATA to the folder holding jfk.flac")
    return path


def have_tensorrt() -> bool:
    """Whether TensorRT (for RTX) imports here: the engine-building tests run on the CPU with it."""
    from fastslm.runtime.errors import FastSLMError
    from fastslm.runtime.trt_compat import import_tensorrt

    try:
        import_tensorrt()
        return True
    except FastSLMError:
        return False


@pytest.fixture
def as_ort_runs_it(tmp_path):
    """graph (path or ModelProto), config -> the graph as ONNX Runtime's CPU provider optimized it for a
    session with fastslm's options (config True) or ONNX Runtime's defaults (config False)."""
    import onnx
    import onnxruntime as ort

    from fastslm.runtime.onnx_backend import session_options

    def optimize(graph, fastslm_options: bool = True) -> onnx.ModelProto:
        source = graph if isinstance(graph, (str, Path)) else graph.SerializeToString()
        options = session_options("int8", ["CPUExecutionProvider"]) if fastslm_options else ort.SessionOptions()
        options.log_severity_level = 3
        out = tmp_path / f"optimized_{len(list(tmp_path.glob('optimized_*.onnx')))}.onnx"
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                             providers=["CPUExecutionProvider"])  # fmt: skip
        return onnx.load(str(out))

    return optimize


def cpu_line() -> str:
    """The CPU's model and SIMD flags: INT8 kernels and fp32 rounding differ between AVX2-only and
    AVX-512/VNNI machines, so a run's log says which kind it ran on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu: unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
            if f in flags]  # fmt: skip
    return f"cpu: {model}; {os.cpu_count()} cores; {' '.join(simd) or 'no AVX2'}"


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(cpu_line())  # at the end, where -q runs and CI logs keep it
