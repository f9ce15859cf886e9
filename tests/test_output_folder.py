"""runtime.output_folder: --out is checked before any work, --force replaces only what fastslm wrote,
and no staging folder survives a failure, Ctrl-C, SIGTERM, or (on the next run) a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastslm.runtime.errors import OptionError, Terminated
from fastslm.runtime.output_folder import OutputFolder, written_by_fastslm

runner = CliRunner()


def _stages(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "sentinel.txt").write_text("mine")
    (path / "photos").mkdir()
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    return path


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- defect 1: --force never deletes what fastslm did not write ----------------------------


@pytest.mark.parametrize("force", [False, True])
def test_force_refuses_a_folder_fastslm_did_not_write(tmp_path, force):
    out = _user_folder(tmp_path / "out")
    before = _tree(out)
    with pytest.raises(OptionError, match="fastslm did not write") as err:
        with OutputFolder(out, force=force):
            pass
    assert "\n" not in str(err.value)
    assert _tree(out) == before and _stages(tmp_path) == []


@pytest.mark.parametrize("record", ["manifest.json", "config.json", "calibration.json"])
def test_force_replaces_what_fastslm_wrote(tmp_path, record):
    fmt = {"manifest.json": "fastslm-bundle", "config.json": "fastslm-model", "calibration.json": "fastslm-calibration"}
    out = tmp_path / "out"
    out.mkdir()
    (out / record).write_text(json.dumps({"format": fmt[record]}))
    (out / "old.bin").write_bytes(b"old")
    assert written_by_fastslm(out)
    with OutputFolder(out, force=True) as output:
        (output.path / "new.bin").write_bytes(b"new")
        output.publish()
    assert _tree(out) == ["new.bin"] and _stages(tmp_path) == []


def test_a_foreign_config_json_is_not_ours(tmp_path):
    out = tmp_path / "hf-model"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "qwen3"}')
    assert not written_by_fastslm(out)


def test_export_cli_force_on_a_user_folder_loses_nothing(tmp_path):
    """The reported data loss: `fastslm-export --force` over a folder with a sentinel and photos/."""
    pytest.importorskip("torch")  # without it the command stops earlier, naming the [export] extra
    from fastslm.export.cli import app

    out = _user_folder(tmp_path / "out")
    before = _tree(out)
    result = runner.invoke(app, ["--model", str(tmp_path / "no-model"), "--out", str(out), "--force"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "fastslm did not write" in lines[0], result.output
    assert _tree(out) == before


def test_export_of_a_real_model_with_force_keeps_a_user_folder(tmp_path):
    """As reported: a valid model, --force, and an --out full of the user's files. Before, the export
    ran and replaced the folder (exit 0); now it is refused before the model is even loaded."""
    pytest.importorskip("torch")
    from fastslm.export.cli import app
    from fastslm.models.tiny import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(model, seed=0)
    out = _user_folder(tmp_path / "out")
    before = _tree(out)
    result = runner.invoke(app, ["--model", str(model), "--out", str(out), "--force"])
    assert result.exit_code == 2 and "fastslm did not write" in result.stderr, result.output
    assert _tree(out) == before and _stages(tmp_path) == []


# ---- defect 3: --out is checked before any work --------------------------------------------


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "sub" / "out"


@pytest.mark.parametrize(
    "make",
    [lambda tmp: Path("/proc/fastslm-out"), lambda tmp: Path("/proc/self/fastslm/out"), _under_a_file],
    ids=["proc", "proc-nested", "under-a-file"],
)
def test_unwritable_out_is_one_line_before_any_work(tmp_path, make):
    out = make(tmp_path)
    with pytest.raises(OptionError) as err:
        with OutputFolder(out):
            pytest.fail("the body must not run")
    assert str(out) in str(err.value) and "\n" not in str(err.value)


def test_immutable_parent_is_one_line(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(OptionError, match="cannot write") as err:
            with OutputFolder(parent / "out"):
                pytest.fail("the body must not run")
        assert "\n" not in str(err.value)
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_export_cli_checks_out_before_loading_the_model(tmp_path):
    pytest.importorskip("torch")  # without it the command stops earlier, naming the [export] extra
    from fastslm.export.cli import app

    # The model does not exist either: the --out error must come first, so no work was started.
    result = runner.invoke(app, ["--model", str(tmp_path / "no-model"), "--out", "/proc/fastslm-out"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == [
        "fastslm-export: error: cannot write --out /proc/fastslm-out (No such file or directory): choose a folder you can write"
    ], result.output


def test_failed_write_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(out):
            raise RuntimeError("simulated")
    assert list(tmp_path.iterdir()) == []


# ---- defect 6: no leftovers on SIGTERM, stale stages removed --------------------------------


def test_sigterm_unwinds_and_removes_the_stage(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Terminated):
        with OutputFolder(out) as output:
            (output.path / "big.bin").write_bytes(b"0" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
            pytest.fail("SIGTERM did not interrupt")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_stale_stages_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.4194999.abc.partial"  # above Linux's largest pid: no such process
    alive = tmp_path / f".out.{os.getpid()}.def.partial"  # a live writer's stage
    foreign = tmp_path / ".out.notapid.partial"  # not named by OutputFolder: not provably ours
    for folder in (dead, alive, foreign):
        folder.mkdir()
        (folder / "x").write_text("x")
    with OutputFolder(out) as output:
        output.publish()
    assert not dead.exists() and alive.exists() and foreign.exists()


@pytest.mark.slow
def test_sigterm_during_a_real_export_leaves_nothing(tmp_path):
    """`fastslm-export` in its own process, terminated once its stage exists: exit 143, one line, no .partial."""
    pytest.importorskip("torch")
    from fastslm.models.tiny import build_tiny_model

    model = tmp_path / "tiny"
    model.mkdir()
    build_tiny_model(model, seed=0)
    work = tmp_path / "bundles"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastslm.export.cli", "--model", str(model), "--out", str(work / "b")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(work.glob(".b.*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(work.glob(".b.*.partial")), "the export never made its stage"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and lines[-1] == "fastslm-export: error: terminated; nothing was written", err
    assert list(work.iterdir()) == []
