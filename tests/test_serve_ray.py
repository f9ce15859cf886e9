"""Ray scale-out on a single-node local cluster: the Serve deployment answers through the openai
client as fastslm-serve does, and the Ray Data batch writes one JSON per recording and resumes.

One Ray start for both (Ray takes 10-20 s to start on two cores), so they share one test module
and one fixture.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from fastslm.runtime.errors import OptionError
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEMO_EVAL_SUBSET
from fastslm.runtime.serve.local import free_port
from fastslm.runtime.serve.options import ServeOptions
from fastslm.runtime.transcribe import transcribe

ray = pytest.importorskip("ray", reason="Ray is in the [ray] extra")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


def test_ray_serve_deployment_answers_like_fastslm_serve(local_ray, pipe, jfk_path):
    from fastslm.runtime.serve.ray_app import ReplicaOptions, run

    options = ServeOptions(port=free_port())
    replicas = ReplicaOptions(min_replicas=1, max_replicas=2, cpus=1)
    url = run(None, options, replicas, blocking=False)
    assert url == f"http://127.0.0.1:{options.port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    with open(jfk_path, "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=f).text == transcribe(pipe, jfk_path).text
    assert client.models.list().data[0].id == pipe.model_name

    deployment = replicas.deployment_options(options)
    assert deployment["autoscaling_config"]["max_replicas"] == 2
    assert deployment["max_ongoing_requests"] == options.workers + options.queue_size


def test_ray_data_batch_writes_one_json_per_recording_and_resumes(local_ray, pipe, tmp_path):
    from fastslm.runtime.serve.ray_batch import BatchOptions, plan, run_batch

    folder = tmp_path / "recordings"
    rows = [json.loads(line) for line in (DEMO_EVAL_SUBSET / "eval_seen.jsonl").read_text().splitlines()[:3]]
    for i, row in enumerate(rows):
        target = folder / ("sub" if i == 2 else "") / f"{row['id']}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_EVAL_SUBSET / row["path"], target)
    (folder / "notes.txt").write_text("not a recording")
    out = tmp_path / "answers"
    options = BatchOptions(folder, out, replicas=1)

    first = run_batch(options)
    assert (first.written, first.skipped, first.failed) == (3, 0, [])
    jsons = sorted(out.rglob("*.json"))
    assert [p.relative_to(out).as_posix() for p in jsons] == [
        f"{rows[0]['id']}.json", f"{rows[1]['id']}.json", f"sub/{rows[2]['id']}.json"]
    for row in rows:
        path = next(p for p in jsons if p.stem == row["id"])
        record = json.loads(path.read_text())
        transcript = transcribe(pipe, DEMO_EVAL_SUBSET / row["path"])
        assert record["text"] == transcript.text and len(record["segments"]) == len(transcript.segments)

    # A crash mid-run leaves finished JSONs, maybe a partial write, and recordings without a JSON;
    # a recording that cannot be read gets an error line and no JSON, so the next run tries it again.
    kept = {p: p.stat().st_mtime_ns for p in jsons[:2]}
    jsons[2].unlink()
    (jsons[2].parent / f".{jsons[2].name}.abc123.partial").write_text('{"cut sh')
    (folder / "broken.flac").write_bytes(b"fLaC not really")
    again = run_batch(options)
    assert (again.written, again.skipped) == (1, 2)
    assert len(again.failed) == 1 and again.failed[0][0].endswith("broken.flac") and "broken.flac" in again.failed[0][1]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished files were not redone
    assert jsons[2].is_file() and not list(out.rglob("*.partial")) and not (out / "broken.json").exists()
    assert [audio.name for audio, _ in plan(options).todo] == ["broken.flac"]


def test_batch_options_refuse_bad_input(tmp_path):
    from fastslm.runtime.serve.ray_batch import BatchOptions, plan

    with pytest.raises(OptionError, match="not a folder"):
        BatchOptions(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(OptionError, match="replicas"):
        BatchOptions(tmp_path, tmp_path / "out", replicas=0)
    with pytest.raises(OptionError, match="no audio files"):
        plan(BatchOptions(tmp_path, tmp_path / "out"))
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "a.flac").write_bytes(b"")
    with pytest.raises(OptionError, match="would both write"):
        plan(BatchOptions(tmp_path, tmp_path / "out"))
