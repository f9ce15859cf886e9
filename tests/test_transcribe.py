"""Transcription of any length (issue #15): pause-cut segments, skipped spans, subtitles, bounded memory.

The recordings are held-out clips of the demo model joined by pauses
(`fastslm.models.demo.recordings`), so where speech is, is known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from fastslm.runtime.audio import SAMPLE_RATE, WINDOW_SECONDS, load_audio
from fastslm.runtime.audio_stream import AudioReader, StreamOptions
from fastslm.runtime.errors import AudioError, OptionError
from fastslm.runtime.loading import DEFAULT_MODEL_DIR
from fastslm.runtime.segmenter import Segmenter, SegmentOptions
from fastslm.runtime.subtitles import render, timestamp, write_outputs
from fastslm.runtime.transcribe import Transcriber, TranscribeOptions

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="needs the shipped demo model")


@pytest.fixture(scope="module")
def recording():
    from fastslm.models.demo.recordings import RecordingOptions, compose

    # ~75 s: three segments or so, and one 6 s silence the VAD must skip.
    return compose(RecordingOptions(seconds=75, seed=3, long_pauses=(0.6, 0.6, 6.0)))


@pytest.fixture(scope="module")
def pipe():
    from fastslm.runtime.generate import Pipeline

    return Pipeline.load()


@pytest.fixture(scope="module")
def transcribed(pipe, recording):
    t = Transcriber(pipe, recording.samples, TranscribeOptions(in_flight=1), sample_rate=SAMPLE_RATE)
    segments = list(t.segments())
    return t, segments


def test_each_segment_gets_the_tokens_it_gets_alone(pipe, recording, transcribed):
    t, segments = transcribed
    assert len(segments) >= 3
    for seg in segments:
        start, end = round(seg.start * SAMPLE_RATE), round(seg.end * SAMPLE_RATE)
        assert 0 < (end - start) / SAMPLE_RATE <= WINDOW_SECONDS
        alone = pipe.generate(recording.samples[start:end], "transcribe", sample_rate=SAMPLE_RATE)
        assert seg.token_ids == alone.token_ids
        assert seg.token_ids  # every segment holds speech, so the model says something
    # In time order, without overlap.
    for a, b in zip(segments, segments[1:]):
        assert a.end <= b.start


def test_batched_rows_sample_as_each_segment_alone(pipe, recording, transcribed):
    from fastslm.runtime.batch_generate import can_batch, generate_rows
    from fastslm.runtime.sampling import SamplingOptions

    # The transcript above went through batches (its default batch of 4 >= its segments).
    assert can_batch(pipe) and TranscribeOptions().batch >= 3
    _, segments = transcribed
    cuts = [recording.samples[round(s.start * SAMPLE_RATE) : round(s.end * SAMPLE_RATE)] for s in segments[:3]]
    sampling = SamplingOptions(temperature=0.8, top_k=50, top_p=0.95, seed=7, max_new_tokens=24)
    rows = generate_rows(pipe, cuts, "transcribe", sampling)
    alone = [pipe.generate(c, "transcribe", sample_rate=SAMPLE_RATE, sampling=sampling) for c in cuts]
    assert [r.token_ids for r in rows] == [a.token_ids for a in alone]
    assert [r.text for r in rows] == [a.text for a in alone]
    assert rows[0].timings["batch_rows"] == 3


def test_skipped_spans_hold_no_speech_and_cover_the_long_pause(recording, transcribed):
    t, segments = transcribed
    speech = []
    for start, end in recording.spans:  # each clip's voiced part: where it rises above -40 dBFS
        loud = np.flatnonzero(np.abs(recording.samples[start:end]) > 0.01)
        speech.append(((start + loud[0]) / SAMPLE_RATE, (start + loud[-1]) / SAMPLE_RATE))
    assert t.skipped
    for a, b in t.skipped:
        for s, e in speech:
            assert b <= s or a >= e, f"skipped {a:.2f}-{b:.2f} s cuts into speech at {s:.2f}-{e:.2f} s"
    # The 6 s silence after the third clip is skipped, bar the padding around its neighbours.
    gap_start, gap_end = recording.spans[2][1] / SAMPLE_RATE, recording.spans[3][0] / SAMPLE_RATE
    assert any(a <= gap_start + 1.0 and b >= gap_end - 1.0 for a, b in t.skipped)
    # Segments and skipped spans tile the recording.
    pieces = sorted([(s.start, s.end) for s in segments] + list(t.skipped))
    assert pieces[0][0] == 0.0 and abs(pieces[-1][1] - recording.seconds) < 1e-6
    assert all(abs(x[1] - y[0]) < 1e-6 for x, y in zip(pieces, pieces[1:]))


def test_subtitles_parse_with_subtitle_libraries(tmp_path, transcribed):
    srt = pytest.importorskip("srt")
    webvtt = pytest.importorskip("webvtt")
    t, segments = transcribed
    transcript = t.transcript()
    spoken = [s for s in segments if s.text.strip()]

    cues = list(srt.parse(render("srt", transcript)))
    assert [c.content for c in cues] == [s.text for s in spoken]
    assert [round(c.start.total_seconds(), 3) for c in cues] == [round(s.start, 3) for s in spoken]
    assert [round(c.end.total_seconds(), 3) for c in cues] == [round(s.end, 3) for s in spoken]

    (tmp_path / "t.vtt").write_text(render("vtt", transcript))
    vtt = webvtt.read(str(tmp_path / "t.vtt"))
    assert [c.text for c in vtt] == [s.text for s in spoken]
    assert [(c.start, c.end) for c in vtt] == [(timestamp(s.start, "."), timestamp(s.end, ".")) for s in spoken]
    assert [c.start_in_seconds for c in vtt] == [int(s.start) for s in spoken]

    record = json.loads(render("json", transcript, audio="x.wav"))
    assert record["text"] == " ".join(s.text for s in spoken)
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(round(s.start, 3), round(s.end, 3)) for s in segments]
    assert record["skipped"] and all(s["end"] > s["start"] for s in record["skipped"])


def test_written_subtitles_are_as_readable_as_any_new_file(tmp_path, transcribed):
    # they are staged with mkstemp, which makes files owner-only: a web server serving them could not read them
    import os

    umask = os.umask(0o022)
    try:
        paths = write_outputs(tmp_path, tmp_path / "talk.wav", transcribed[0].transcript())
    finally:
        os.umask(umask)
    assert {fmt: oct(p.stat().st_mode & 0o777) for fmt, p in paths.items()} == {fmt: oct(0o644) for fmt in paths}


def test_memory_is_bounded_by_the_window_not_the_recording(recording, transcribed):
    t, _ = transcribed
    assert t.max_in_flight <= 1
    block = StreamOptions().block_samples
    limit = WINDOW_SECONDS * SAMPLE_RATE + block + SAMPLE_RATE
    assert t.segmenter.max_buffer_samples <= limit

    # An hour of uninterrupted "speech" (a detector that always says yes): cut at <= 30 s, buffer bounded.
    class AlwaysSpeech:
        def __call__(self, block, last=False):
            return np.ones(len(block) // 512, np.float32)

    block = 320 * 512  # whole 32 ms frames, so the fake detector keeps pace with the samples

    seg = Segmenter(SegmentOptions(), detector=AlwaysSpeech())
    blocks = (np.zeros(block, np.float32) for _ in range(3600 * SAMPLE_RATE // block))
    spans = [(s.start, s.end) for s in seg.segments(blocks)]
    assert seg.max_buffer_samples <= limit
    assert len(spans) >= 3600 // WINDOW_SECONDS
    assert all(0 < e - s <= WINDOW_SECONDS * SAMPLE_RATE for s, e in spans)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # nothing skipped, nothing twice


def test_streamed_reader_equals_whole_file_loading(tmp_path, recording):
    stereo = np.stack([recording.samples[: 20 * SAMPLE_RATE]] * 2, axis=1)
    import soxr

    path = tmp_path / "x.flac"
    sf.write(path, soxr.resample(stereo, SAMPLE_RATE, 44100), 44100, subtype="PCM_24")
    whole = load_audio(path)
    blocks = list(AudioReader(path, options=StreamOptions(block_seconds=3.0)).blocks())
    assert max(len(b) for b in blocks) <= 3 * SAMPLE_RATE + 64
    assert np.array_equal(np.concatenate(blocks), whole)


def test_bad_input_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(AudioError, match="cannot read"):
        AudioReader(bad)
    with pytest.raises(OptionError):
        SegmentOptions(max_seconds=45)
    with pytest.raises(OptionError):
        TranscribeOptions(in_flight=0)


def test_cli_writes_all_formats_and_never_replaces_files(tmp_path, recording):
    audio = tmp_path / "talk.wav"
    sf.write(audio, recording.samples[: 20 * SAMPLE_RATE], SAMPLE_RATE)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from fastslm.runtime.cli import main; main()", str(audio), "--format", "srt",
           "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["talk.json", "talk.srt", "talk.txt", "talk.vtt"]
    assert done.stdout.startswith("1\n00:00:")  # streamed SubRip cues
    record = json.loads((out / "talk.json").read_text())
    assert record["segments"] and record["text"] == (out / "talk.txt").read_text().replace("\n", " ").strip()
    before = (out / "talk.srt").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (out / "talk.srt").read_text() == before
