"""models/demo/run_recipe.sh: chunks of limited length, resume after a stop, a failed stage stops it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[1] / "models" / "demo" / "run_recipe.sh"

# Stands in for python: records each call; train runs past the chunk limit once (the driver stops it
# with SIGTERM), then finishes; the stage named in FAIL_STAGE exits 2 while FAIL_STAGE is set.
FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
echo "${FASTSLM_SHARED_DATA:-unset}" > "$CALLS.shared_data"
stage=corpus
for a in "$@"; do [ "$prev" = --stage ] && stage=$a; prev=$a; done
[ "$stage" = "${FAIL_STAGE:-}" ] && { echo "boom" >&2; exit 2; }
if [ "$stage" = train ]; then
    if [ ! -f "$CALLS.slow_done" ]; then touch "$CALLS.slow_done"; trap 'echo "train: stopped"; exit 0' TERM; sleep 30 & wait; fi
    echo "train: finished at step 4"
fi
exit 0
"""


def run_driver(state: Path, fake: Path, calls: Path, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), CHUNK_SECONDS="2", **env)
    environ.pop("FASTSLM_SHARED_DATA", None)  # the driver finds the repository's ../shared/data itself
    return subprocess.run(["bash", str(DRIVER), str(state)], env=environ, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def fake(tmp_path) -> Path:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def stages_called(calls: Path) -> list[str]:
    out = []
    for line in calls.read_text().splitlines():
        words = line.split()
        out.append(words[words.index("--stage") + 1] if "--stage" in words else "corpus")
    return out


def test_driver_runs_every_stage_in_chunks_and_resumes(tmp_path, fake):
    state, calls = tmp_path / "state", tmp_path / "calls"
    result = run_driver(state, fake, calls, FAIL_STAGE="features")
    assert result.returncode == 1
    log = (state / "driver.log").read_text()
    assert "driver stops: features failed (rc 2); fix it and rerun the command" in log
    assert stages_called(calls) == ["corpus", "tokenizer", "windows", "features"]
    # the defaults are the settings docs/DEMO_MODEL.md gives for the shipped model's run
    doc = (DRIVER.parents[2] / "docs" / "DEMO_MODEL.md").read_text()
    documented = doc.split("(`corpus.args`, `recipe.args`):", 1)[1].split("```")[1].strip().splitlines()
    assert (state / "corpus.args").read_text().split() == documented[0].split()
    assert (state / "recipe.args").read_text().split() == " ".join(documented[1:]).split()
    # the stages see the repository's ../shared/data (the eval stage scores jfk.flac from it)
    shared = DRIVER.parents[3] / "shared" / "data"
    if (shared / "jfk.flac").is_file():
        assert Path((calls.parent / "calls.shared_data").read_text().strip()) == shared.resolve()
    # the same command again resumes at the failed stage; train overruns its 2 s chunk once
    result = run_driver(state, fake, calls)
    assert result.returncode == 0
    assert stages_called(calls)[4:] == ["features", "align", "train", "train", "export-folder", "eval", "bundle",
                                        "eval-bundle"]
    log = (state / "driver.log").read_text()
    assert "train: chunk end rc=124" in log and "recipe done" in log
    assert {p.name for p in state.glob("done.*")} == {f"done.{s}" for s in (
        "corpus", "tokenizer", "windows", "features", "align", "train", "export-folder", "eval", "bundle",
        "eval-bundle")}
    train_chunks = (state / "seconds.train").read_text().splitlines()
    assert len(train_chunks) == 2 and all(len(line.split()) == 2 for line in train_chunks)  # wall and CPU seconds
    assert int(train_chunks[0].split()[0]) >= 2
    # finished: a rerun calls nothing
    before = calls.read_text()
    assert run_driver(state, fake, calls).returncode == 0 and calls.read_text() == before


# train burns CPU for 20 s on its first call (the driver is killed meanwhile), then finishes at once
BUSY_PYTHON = """#!/bin/bash
stage=corpus
for a in "$@"; do [ "$prev" = --stage ] && stage=$a; prev=$a; done
if [ "$stage" = train ]; then
    if [ ! -f "$CALLS.busy_done" ]; then touch "$CALLS.busy_done"; end=$((SECONDS + 20)); while [ $SECONDS -lt $end ]; do :; done; fi
    echo "train: finished at step 4"
fi
exit 0
"""


def test_a_chunk_killed_with_its_driver_keeps_its_time(tmp_path):
    import signal
    import time

    state, calls, fake = tmp_path / "state", tmp_path / "calls", tmp_path / "busy_python"
    fake.write_text(BUSY_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), CHUNK_SECONDS="60", TICK_SECONDS="1")
    driver = subprocess.Popen(["bash", str(DRIVER), str(state)], env=env, start_new_session=True)

    def train_cpu_so_far() -> int:  # the running chunk's reading: "STAGE WALL CPU"
        reading = (state / ".chunk").read_text().split() if (state / ".chunk").is_file() else []
        return int(reading[2]) if reading[:1] == ["train"] else -1

    deadline = time.monotonic() + 60
    while train_cpu_so_far() < 2:
        assert time.monotonic() < deadline and driver.poll() is None, (state / "driver.log").read_text()
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # what the end of a session does: no trap runs, no line is written
    driver.wait()
    assert not (state / "seconds.train").exists()
    # the next start adds the killed chunk's last reading, then runs on to the end
    assert subprocess.run(["bash", str(DRIVER), str(state)], env=env, timeout=120).returncode == 0
    chunks = [line.split() for line in (state / "seconds.train").read_text().splitlines()]
    assert len(chunks) == 2
    wall, cpu = map(int, chunks[0])
    assert wall >= 2 and cpu >= 2  # the busy loop's CPU, read from /proc while it ran
    assert "train: the chunk before was killed with its driver" in (state / "driver.log").read_text()
    assert not (state / ".chunk").exists() and (state / "done.eval").is_file()
