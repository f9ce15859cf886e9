"""Whole-process runs: each system transcribes a recording in a fresh process; wall time and peak RSS.

A run is what a user pays: interpreter start, imports, model load, reading the file, the
transcript. Peak RSS is the child's own maximum resident set (os.wait4), not the bench's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PEER = "faster-whisper"


@dataclass(frozen=True)
class System:
    """One thing to time: a fastslm model + backend, or the peer."""

    name: str  # e.g. "fastslm onnx-int8", "fastslm torch", "faster-whisper"
    model: Path | None = None  # bundle or model folder (fastslm); None for the peer
    backend: str = "onnx"

    @property
    def is_peer(self) -> bool:
        return self.name == PEER

    def command(self, audio: Path) -> list[str]:
        if self.is_peer:
            return [sys.executable, "-m", "fastslm.runtime.bench.peer", str(audio)]
        # greedy, as the peer decodes (beam 1), whatever the model recommends
        cmd = [sys.executable, "-m", "fastslm.runtime.cli", "--format", "json", "--backend", self.backend, "--beam-size", "1"]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        return cmd + [str(audio)]


@dataclass
class RunResult:
    system: str
    seconds: float  # audio length
    repeat: int
    wall_s: float
    peak_rss_mb: float  # MiB (VmHWM KiB / 1024)
    text: str
    windows: int | None  # fastslm: segments (one audio-tower window each)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def run_once(system: System, audio: Path, seconds: float, repeat: int, log: Path, out_dir: Path) -> RunResult:
    """Run `system` on `audio` in its own process; stdout to a file in `out_dir`, stderr appended to `log`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    out_path = out_dir / f"{system.name.replace(' ', '_')}-{seconds:.0f}s-{repeat}.json"
    with open(log, "a") as err, open(out_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(system.command(audio), stdout=out, stderr=err, env=env)
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = _high_water_kib(proc.pid) or peak_kib
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
    rss_mb = peak_kib / 1024.0
    if proc.returncode != 0:
        return RunResult(system.name, seconds, repeat, wall, rss_mb, "", None, f"exit {proc.returncode} (see {log})")
    record = json.loads(out_path.read_text().strip().splitlines()[-1])
    return RunResult(system.name, seconds, repeat, wall, rss_mb, record.get("text", ""), record.get("windows"))


POLL_SECONDS = 0.05


def _high_water_kib(pid: int) -> int | None:
    """The process's peak resident set so far (VmHWM, KiB), or None once it is gone.

    Not the child's ru_maxrss from wait4: that includes the memory of the process it was forked
    from (the bench, 1 GB after composing the hour-long recording) up to its exec. VmHWM belongs
    to the address space, which exec replaces, so it is the program's own peak; it only grows,
    and the last reading is taken at most POLL_SECONDS before the process ends.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def load_results(path: Path) -> list[RunResult]:
    if not path.is_file():
        return []
    return [RunResult(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
