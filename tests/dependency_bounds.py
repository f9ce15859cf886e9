"""Run the runtime's tests with the base dependencies at the lowest and at the newest allowed versions.

    python tests/dependency_bounds.py lowest  WORK_DIR [TEST ...]   # every ">=" bound exactly
    python tests/dependency_bounds.py newest  WORK_DIR [TEST ...]   # the newest release under each "<" bound

TEST: pytest paths or node ids relative to the checkout (default: RUNTIME_TESTS). The suite runs
a subset at both ends through tests/test_dependency_bounds.py; a release check runs all of
RUNTIME_TESTS with this script. The ranges come from pyproject.toml ([project] dependencies and
the [cpu] extra), so the check follows them when they change. fastslm itself goes in with
--no-deps (or, for the suite, as a link to the checkout), so the venv holds exactly the versions
chosen here; the tests that need PyTorch or TensorRT skip. pip's cache is used: a second run
downloads nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The runtime's tests that need none of the extras beyond [cpu] (the prompt, tokenizer and sampling
# tests compare against transformers / jinja2 / torch, so they run in the full suite only).
RUNTIME_TESTS = ["tests/test_audio.py", "tests/test_hostile_input.py", "tests/test_output_folder.py",
                 "tests/test_fuzz.py", "tests/test_packaging.py"]  # fmt: skip
TEST_TOOLS = ["pytest==9.2.0", "hypothesis==6.170.17"]
# How pip reports that it reached no index (urllib3 / requests / socket errors in its retries).
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "ConnectTimeout", "ReadTimeout", "ProxyError", "Connection refused",
                  "No route to host", "Name or service not known")  # fmt: skip


class IndexUnreachable(Exception):
    """pip reached no package index."""


def requirements(which: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["cpu"]
    out = []
    for spec in specs:
        name, ranges = re.match(r"([A-Za-z0-9_.-]+)(.*)", spec).groups()
        if which == "lowest":
            low = re.search(r">=\s*([^,\s]+)", ranges)
            out.append(f"{name}=={low.group(1)}" if low else spec)
        else:
            out.append(spec)
    return out


def newest_allowed(work: Path) -> dict[str, str]:
    """The newest release each base range allows, as pip resolves it for this Python (nothing installed)."""
    report = work / "newest-allowed.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q",
                          "--retries", "1", "--timeout", "20", "--report", str(report), *requirements("newest")],
                         capture_output=True, text=True)  # fmt: skip
    if run.returncode:
        lines = run.stderr.strip().splitlines() or ["no output"]
        network = [line for line in lines if any(error in line for error in NETWORK_ERRORS)]
        if network:
            errno = re.search(r"\[Errno [^\]]+\][^'\"]*", network[-1])
            raise IndexUnreachable(errno.group(0).strip() if errno else network[-1].strip()[-200:])
        raise RuntimeError(f"pip could not resolve the base ranges: {lines[-1]}")
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


def pip_into(venv: Path) -> list[str]:
    """The pip command that installs into `venv`, creating it first.

    pip >= 22.3 installs into another environment (--python), so the venv is made without its own
    pip: ensurepip costs 15 s of a 2-core machine."""
    python = venv / "bin" / "python"
    outer = tuple(int(p) for p in re.findall(r"\d+", version("pip"))[:2])
    if outer >= (22, 3):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        return [sys.executable, "-m", "pip", "--python", str(python)]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return [str(python), "-m", "pip"]


def link_checkout(venv: Path) -> None:
    """fastslm importable from the checkout itself (a .pth naming a folder whose `fastslm` links to it)."""
    folder = venv / "checkout"
    folder.mkdir(exist_ok=True)
    if not (folder / "fastslm").exists():
        (folder / "fastslm").symlink_to(REPO, target_is_directory=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "fastslm-checkout.pth").write_text(f"{folder}\n")


def main(which: str, work: Path, tests: list[str] | None = None, *, from_checkout: bool = False) -> int:
    """Build (or reuse) WORK/venv-WHICH at that end of the ranges and run `tests` there; pytest's exit code.

    from_checkout: link the checkout instead of building and installing its wheel (the suite's
    subset: the versions are what it checks, and the wheel build costs ~40 s)."""
    venv = work / f"venv-{which}"
    pip = pip_into(venv)
    python = venv / "bin" / "python"
    reqs = requirements(which)
    upgrade = ["--upgrade"] if which == "newest" else []
    subprocess.run([*pip, "install", "-q", "--no-compile", *upgrade, *reqs, *TEST_TOOLS], check=True)
    if from_checkout:
        link_checkout(venv)
    else:
        subprocess.run([*pip, "install", "-q", "--no-compile", "--no-deps", "--force-reinstall", str(REPO)], check=True)
    versions = subprocess.run([*pip, "freeze"], capture_output=True, text=True, check=True).stdout
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in reqs}
    print(f"{which}: " + ", ".join(line for line in versions.splitlines()
                                   if line.split("==")[0].lower().replace("_", "-") in names))  # fmt: skip
    # From outside the checkout, so fastslm is imported as the venv has it (installed, or linked).
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                           *[str(REPO / t) for t in tests or RUNTIME_TESTS]], cwd=work).returncode  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("lowest", "newest"):
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], Path(sys.argv[2]).resolve(), sys.argv[3:]))
