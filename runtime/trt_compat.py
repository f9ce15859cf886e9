"""Which TensorRT is installed, and whether engines built elsewhere can run here.

Two TensorRT flavours share one Python API (the module differs, the calls are the same):

- `tensorrt`: JetPack on Jetson, datacenter and Linux desktop GPUs. Engines are built on the
  GPU that runs them and hold kernels for its compute capability only.
- `tensorrt_rtx` (TensorRT for RTX, `pip install 'fastslm[trt]'`): engines are compiled ahead of
  time, even on a machine without a GPU, for a set of target compute capabilities, and
  specialised for the user's GPU when they are loaded.

An engine runs only under the exact TensorRT flavour and version that built it, and only on a
GPU it was built for. The engine manifest (`engines.json`, written by
`fastslm.export.tensorrt_build`) records both; `check_engine_manifest` compares them with this
machine and raises one `EngineMismatchError` line that says to rebuild. No torch, and no GPU
needed to run the check itself: the "current" facts can be passed in.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ModelFileError, OptionError


def tensorrt_cache_dir() -> Path:
    """Where compiled TensorRT artefacts are kept between runs (ONNX Runtime's TensorRT EP engines,
    TensorRT for RTX runtime caches): $XDG_CACHE_HOME/fastslm/tensorrt, by default ~/.cache/..."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastslm" / "tensorrt"

FLAVOURS = ("tensorrt", "tensorrt_rtx")
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT for RTX"}
ENGINE_MANIFEST_FILE = "engines.json"
ENGINE_FORMAT = "fastslm-trt-engines"
ENGINE_FORMAT_VERSION = 1

# TensorRT for RTX engines built without explicit targets run on these (its documentation:
# Ampere, Ada and Blackwell RTX; Turing, 7.5, only when named as a target).
RTX_MIN_DEFAULT_CC = (8, 0)
# Where TensorRT for RTX's runtime runs at all. Measured 2026-11-25 with 1.7.1.116 on an H200 (9.0):
# deserializing refuses with "Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0", for engines
# built with default targets and with CURRENT alike; its builder still writes a CURRENT engine there.
# So datacenter Hopper (9.0), datacenter Blackwell (10.x) and Jetson (8.7, 11.0) need full TensorRT.
RTX_RUNTIME_CCS = frozenset({(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)})


def rtx_runs_on(cc: tuple[int, int]) -> bool:
    return cc in RTX_RUNTIME_CCS or cc > (12, 0)


def rtx_unsupported_message(device: "DeviceFacts") -> str:
    runs_on = ", ".join(format_cc(cc) for cc in sorted(RTX_RUNTIME_CCS) if cc < (12, 0)) + ", 12.x"
    return (
        f"TensorRT for RTX does not run on {device.name} (compute capability {device.compute_capability}; it runs on "
        f"RTX-class GPUs: {runs_on}); on this GPU use full TensorRT (--trt-flavour tensorrt, "
        "from NVIDIA or JetPack) or the ONNX Runtime backend"
    )


class TensorRTMissingError(OptionError):
    """No usable TensorRT Python module is installed."""


class EngineMismatchError(ModelFileError):
    """The engines were built for another TensorRT version or GPU."""


def import_tensorrt(flavour: str = "auto") -> tuple[ModuleType, str]:
    """Import a TensorRT flavour: "tensorrt", "tensorrt_rtx", or "auto" (full TensorRT first)."""
    if flavour not in ("auto", *FLAVOURS):
        raise OptionError(f"unknown TensorRT flavour {flavour!r}; choose auto, {', '.join(FLAVOURS)}")
    for name in FLAVOURS if flavour == "auto" else (flavour,):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if name == "tensorrt" and int(module.__version__.split(".")[0]) < 10:
            raise TensorRTMissingError(
                f"TensorRT {module.__version__} is too old: fastslm needs TensorRT 10 or newer (JetPack 6 on Jetson)"
            )
        return module, name
    wanted = "TensorRT" if flavour == "auto" else FLAVOUR_NAMES[flavour]
    raise TensorRTMissingError(
        f"{wanted} is not installed: pip install 'fastslm[trt]' (TensorRT for RTX), or on Jetson use JetPack's "
        "python3-libnvinfer; or use the ONNX Runtime backend"
    )


@dataclass(frozen=True)
class DeviceFacts:
    name: str
    compute_capability: str  # "8.7"
    total_memory: int  # bytes

    @property
    def cc(self) -> tuple[int, int]:
        return parse_cc(self.compute_capability)


@dataclass(frozen=True)
class TrtEnvironment:
    """The TensorRT and GPU an engine is about to be built or run with."""

    flavour: str
    version: str
    device: DeviceFacts | None  # None: no CUDA GPU visible (or cuda-python missing)


def parse_cc(text: str) -> tuple[int, int]:
    """'8.9' or 'sm89' / '89' -> (8, 9); '12.0' / 'sm120' -> (12, 0)."""
    raw = str(text).strip().lower().removeprefix("sm").removeprefix("_")
    try:
        if "." in raw:
            major, minor = raw.split(".", 1)
            return int(major), int(minor)
        value = int(raw)
        return value // 10, value % 10
    except ValueError:
        raise OptionError(f"compute capability {text!r} is not like '8.9' or 'sm89'") from None


def format_cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def current_device(index: int = 0) -> DeviceFacts | None:
    """Name, compute capability and memory of CUDA device `index`, or None without one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= index:
        return None
    err, props = cudart.cudaGetDeviceProperties(index)
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceFacts(name.rstrip("\x00"), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def current_environment(flavour: str = "auto", device: DeviceFacts | None | str = "detect") -> TrtEnvironment:
    trt, name = import_tensorrt(flavour)
    return TrtEnvironment(name, trt.__version__, current_device() if device == "detect" else device)


def rebuild_hint(manifest: dict[str, Any], extra: str = "") -> str:
    target = manifest.get("target") or "trt-fp16"
    return f"rebuild the engines on this machine with `fastslm-export --target {target}{extra}`"


def read_engine_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ENGINE_MANIFEST_FILE
    if not path.is_file():
        raise EngineMismatchError(
            f"{folder} has no {ENGINE_MANIFEST_FILE}: it holds no TensorRT engines; "
            "build them with `fastslm-export --target trt-fp16`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineMismatchError(f"{path} is damaged ({exc}); rebuild the engines with `fastslm-export --target trt-fp16`") from None
    if not isinstance(manifest, dict):
        raise EngineMismatchError(f"{path} is damaged; rebuild the engines with `fastslm-export --target trt-fp16`")
    return manifest


def check_engine_manifest(manifest: dict[str, Any], env: TrtEnvironment, where: str | Path = "the bundle") -> None:
    """Raise EngineMismatchError unless engines described by `manifest` can run in `env`."""
    hint = rebuild_hint(manifest)
    if manifest.get("format") != ENGINE_FORMAT:
        raise EngineMismatchError(f"{where} has no TensorRT engine manifest ({ENGINE_MANIFEST_FILE}); {hint}")
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise EngineMismatchError(
            f"{where}: engine manifest version {manifest.get('format_version')} is not the one this fastslm reads "
            f"({ENGINE_FORMAT_VERSION}); {hint}"
        )
    built = manifest.get("tensorrt", {})
    b_flavour, b_version = built.get("flavour"), built.get("version")
    if b_flavour != env.flavour or b_version != env.version:
        raise EngineMismatchError(
            f"{where}: the engines were built with {FLAVOUR_NAMES.get(b_flavour, b_flavour)} {b_version}, this machine "
            f"has {FLAVOUR_NAMES[env.flavour]} {env.version}; {hint}"
        )
    device = manifest.get("device", {})
    if env.device is None:
        return  # nothing to compare; running needs a GPU and says so itself
    here = env.device.cc
    targets = device.get("target_compute_capabilities")
    if env.flavour == "tensorrt_rtx" and not rtx_runs_on(here):
        raise EngineMismatchError(f"{where}: {rtx_unsupported_message(env.device)}")
    if device.get("aot"):
        if targets == "default" or not targets:
            if here < RTX_MIN_DEFAULT_CC:
                raise EngineMismatchError(
                    f"{where}: the engines target TensorRT for RTX's default GPUs (compute capability 8.0 and newer), "
                    f"this {env.device.name} is {env.device.compute_capability}; "
                    + rebuild_hint(manifest, f" --trt-compute-capability {env.device.compute_capability}")
                )
            return
        allowed = {parse_cc(t) for t in targets}
        if here not in allowed:
            raise EngineMismatchError(
                f"{where}: the engines were compiled for compute capability {', '.join(sorted(targets))}, this "
                f"{env.device.name} is {env.device.compute_capability}; {hint}"
            )
        return
    b_cc = device.get("compute_capability")
    if b_cc is None or parse_cc(b_cc) != here:
        raise EngineMismatchError(
            f"{where}: the engines were built on {device.get('gpu_name')} (compute capability {b_cc}), this GPU is "
            f"{env.device.name} ({env.device.compute_capability}); {hint}"
        )
    if device.get("gpu_name") and device["gpu_name"] != env.device.name:
        warnings.warn(
            f"{where}: engines built on {device['gpu_name']} run on {env.device.name} (same compute capability) "
            f"but may be slower; {hint}",
            stacklevel=2,
        )


_NOISE = ("Thread context has not been set",)  # TensorRT for RTX logs this at INTERNAL_ERROR on every build


def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A TensorRT logger that keeps the errors (for one-line messages) and prints only when verbose."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if any(noise in msg for noise in _NOISE):
                return
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            if verbose and severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return Logger()


def validity_problem(trt: ModuleType, runtime: Any, blob: bytes) -> str | None:
    """TensorRT for RTX's own header check (Runtime.get_engine_validity); None when valid or unsupported."""
    check = getattr(runtime, "get_engine_validity", None)
    if check is None:
        return None
    validity, diagnostics = check(blob)
    if validity != trt.EngineValidity.INVALID:
        return None
    reasons = [
        name.lower().replace("_", " ")
        for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
        if int(diagnostics) & int(flag)
    ]
    return ", ".join(reasons) or "invalid engine"
