"""Run bundles under other onnxruntime releases than this environment's: which decoder form loads where.

    python tests/onnxruntime_releases.py AUDIO BUNDLE [BUNDLE ...] --python PY [--python PY ...]

Each PY is the interpreter of an environment that holds one onnxruntime release (and numpy) and
nothing else, e.g. `python -m venv /tmp/ort1.20 && /tmp/ort1.20/bin/pip install onnxruntime==1.20.0`.
fastslm and the runtime's other dependencies come from this environment, behind that release's
own packages on sys.path. Per release and bundle it prints whether onnxruntime itself loads the
LLM graph (an InferenceSession, without the runtime's version check) and what `fastslm-run
--model BUNDLE AUDIO` answers, or its error line. Exit status: 1 if a copied-form bundle failed
anywhere (that form must load in every release the [gpu] range allows), else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sysconfig
from pathlib import Path

import fastslm

CHILD = """
import json, sys
checkout, site, bundle, audio = sys.argv[1:5]
sys.path.insert(0, checkout)
sys.path.append(site)  # after the release's own onnxruntime and numpy
import onnxruntime as ort
graph = json.load(open(bundle + "/manifest.json"))["graphs"]["llm"]["file"]
try:
    ort.InferenceSession(bundle + "/" + graph, providers=["CPUExecutionProvider"])
    print("onnxruntime:", ort.__version__, "loads the LLM graph", file=sys.stderr)
except Exception as exc:
    print("onnxruntime:", ort.__version__, "refuses the LLM graph:", " ".join(str(exc).split())[:300], file=sys.stderr)
from fastslm.runtime.cli import main
sys.argv = ["fastslm-run", "--model", bundle, "--max-new-tokens", "24", audio]
main()
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", type=Path)
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--python", action="append", required=True, help="interpreter of a one-release environment")
    a = p.parse_args()
    checkout = str(Path(fastslm.__file__).parent.parent)  # the folder that holds the `fastslm` package (or its link)
    site = sysconfig.get_paths()["purelib"]
    failed = 0
    for python in a.python:
        for bundle in a.bundles:
            llm = json.loads((bundle / "manifest.json").read_text())["graphs"]["llm"]
            # Bundles from before the manifest said so: the form shows in the past_length input.
            form = llm.get("decoder_cache") or ("in-place" if "past_length" in [t["name"] for t in llm["inputs"]] else "copied")
            run = subprocess.run([python, "-c", CHILD, checkout, site, str(bundle.resolve()), str(a.audio.resolve())],
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            lines = [line for line in run.stderr.splitlines() if line.startswith(("onnxruntime:", "fastslm-run: error"))]
            answer = run.stdout.strip().replace("\n", " ")[:100]
            print(f"{python}  {bundle.name} ({form}): " + "; ".join(lines) + f"; fastslm-run exit {run.returncode}"
                  + (f", answer: {answer!r}" if run.returncode == 0 else ""))  # fmt: skip
            failed += form == "copied" and run.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
