"""Both ends of the base dependencies' ranges, inside the suite (CI runs exactly the suite).

lowest  a venv with every ">=" bound installed exactly (tests/dependency_bounds.py) runs a runtime
        subset: audio loading and resampling, the shipped ONNX bundle end to end through the
        Python API and fastslm-run (tokenizer, VAD, CLI), hostile input.
newest  the suite itself runs at the newest end when its environment holds the newest release
        each range allows: checked here (pip resolves the ranges without installing). Where another
        extra holds one back, the subset runs in a venv at the newest end instead.

Both need a package index and skip without one. pip's cache is used, so a rerun downloads nothing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pytest

from . import dependency_bounds as bounds

pytestmark = [pytest.mark.slow, pytest.mark.network]
# One runtime test file per base dependency's job, no more: the whole RUNTIME_TESTS list at
# the lowest end takes minutes on CI's 2 cores (tests/dependency_bounds.py runs it for a release).
SUBSET = ["tests/test_audio.py", "tests/test_hostile_input.py"]


@pytest.fixture(scope="module")
def newest(tmp_path_factory) -> dict[str, str]:
    try:
        return bounds.newest_allowed(tmp_path_factory.mktemp("bounds"))
    except bounds.IndexUnreachable as exc:
        pytest.skip(f"no package index reachable ({exc}): the bounds check needs one to install those versions")


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def test_runtime_at_the_lowest_bounds(newest, tmp_path):
    failed = bounds.main("lowest", tmp_path, SUBSET, from_checkout=True)
    assert failed == 0, "the runtime subset failed at the lowest bounds (its pytest log is above)"


def test_runtime_at_the_newest_bounds(newest, tmp_path):
    behind = {name: (installed(name), latest) for name, latest in newest.items() if installed(name) != latest}
    if not behind:
        return  # the whole suite ran on the newest allowed releases
    assert bounds.main("newest", tmp_path, SUBSET, from_checkout=True) == 0, (
        f"the runtime subset failed at the newest bounds (this environment holds {behind})"
    )
