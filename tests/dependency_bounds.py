"""Run the runtime's tests with the base dependencies at the lowest and at the newest allowed versions.

    python tests/dependency_bounds.py lowest  WORK_DIR    # every ">=" bound exactly
    python tests/dependency_bounds.py newest  WORK_DIR    # the newest release under each "<" bound

Not a pytest module (it builds a venv and downloads wheels): CI or a release check runs it
beside the suite. The ranges come from pyproject.toml ([project] dependencies and the [cpu]
extra), so the check follows them when they change. fastslm itself goes in with --no-deps, so
the venv holds exactly the versions chosen here; the tests that need PyTorch or TensorRT skip.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The runtime's tests that need none of the extras beyond [cpu] (the prompt, tokenizer and sampling
# tests compare against transformers / jinja2 / torch, so they run in the full suite only).
RUNTIME_TESTS = ["tests/test_audio.py", "tests/test_hostile_input.py", "tests/test_output_folder.py",
                 "tests/test_fuzz.py", "tests/test_packaging.py"]  # fmt: skip
TEST_TOOLS = ["pytest==9.2.0", "hypothesis==6.170.17"]


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


def main(which: str, work: Path) -> int:
    venv = work / f"venv-{which}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    reqs = requirements(which)
    upgrade = ["--upgrade"] if which == "newest" else []
    subprocess.run([str(python), "-m", "pip", "install", "-q", *upgrade, *reqs, *TEST_TOOLS], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)], check=True)
    versions = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in reqs}
    print(f"{which}: " + ", ".join(line for line in versions.splitlines()
                                   if line.split("==")[0].lower().replace("_", "-") in names))  # fmt: skip
    # From outside the checkout, so the installed fastslm (not the source tree) is what runs.
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                           *[str(REPO / t) for t in RUNTIME_TESTS]], cwd=work).returncode  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("lowest", "newest"):
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], Path(sys.argv[2]).resolve()))
