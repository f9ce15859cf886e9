"""Many questions about one recording (issue 16): the audio prefix reused in memory and from a saved
cache, streamed input, and recordings past the context answered in parts.

Each path is held to the plain one: a one-shot `Pipeline.prefill` of the whole prompt from the
same audio, then the same greedy loop; the answer tokens must be the same.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fastslm.models.tiny import build_tiny_model, tiny_config
from fastslm.models.torch_backend import TorchBackend
from fastslm.runtime.audio import SAMPLE_RATE, audio_to_windows, load_audio
from fastslm.runtime.beyond_context import _reduce_instruction, plan_parts
from fastslm.runtime.cli import app as run_app
from fastslm.runtime.errors import CacheFileError, OptionError
from fastslm.runtime.generate import Pipeline, Prefill, SpeechTokens
from fastslm.runtime.loading import DEFAULT_MODEL_DIR, DEMO_EVAL_SUBSET
from fastslm.runtime.mel_stream import MelWindowStream
from fastslm.runtime.prefix_cache import cache_path_for
from fastslm.runtime.prompt import Task, build_text_prompt
from fastslm.runtime.sampling import SamplingOptions
from fastslm.runtime.session import AudioSession, samples_sha256
from fastslm.runtime.tokenizer import Tokenizer

GREEDY = SamplingOptions(max_new_tokens=12)
PROMPTS = ["transcribe", "What is the first word?", "How many words were said?", "summarize"]


class CountingBackend:
    """A backend wrapper that counts audio-tower windows (the prefix must not run it twice)."""

    def __init__(self, backend):
        self.backend, self.windows_encoded = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_windows(self, mel):
        self.windows_encoded += len(mel)
        return self.backend.encode_windows(mel)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-varied")
    build_tiny_model(folder, seed=2, varied_llm=True)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Pipeline:
    return Pipeline(CountingBackend(TorchBackend.from_folder(tiny_dir)), Tokenizer.from_file(tiny_dir / "tokenizer.json"), identity="tiny-a")


@pytest.fixture(scope="module")
def recording() -> np.ndarray:
    """95 s (4 windows) of held-out clips; one second in window 3 made louder than anything before it,
    so a streamed session must re-clamp (and re-encode) the earlier windows."""
    clips = [load_audio(p) for p in sorted(DEMO_EVAL_SUBSET.glob("audio/*/*.flac"))]
    samples = np.concatenate(clips)[: 95 * SAMPLE_RATE].copy()
    samples[70 * SAMPLE_RATE : 71 * SAMPLE_RATE] *= 3.0
    return load_audio(np.round(samples * 32767).astype(np.int16), SAMPLE_RATE)  # as 16-bit PCM holds it


def plain(pipe: Pipeline, samples, prompts: list[str], sampling=GREEDY) -> dict[str, list[int]]:
    """The plain path: one prefill of the whole prompt, then the greedy loop."""
    speech = samples if isinstance(samples, SpeechTokens) else pipe.encode(samples, SAMPLE_RATE)
    return {p: list(pipe.decode_tokens(pipe.prefill(speech, p), sampling)) for p in prompts}


@pytest.fixture(scope="module")
def expected(tiny, whole_speech) -> dict[str, list[int]]:
    return plain(tiny, whole_speech, PROMPTS)


@pytest.fixture(scope="module")
def whole_speech(tiny, recording) -> SpeechTokens:
    return tiny.encode(recording, SAMPLE_RATE)


def test_mel_stream_windows_equal_whole_recording(recording):
    rng = np.random.default_rng(0)
    for n in (8000, 480039, 480040, 480160, len(recording)):
        x = recording[:n]
        stream, windows, i = MelWindowStream(80), [], 0
        while i < n:
            step = int(rng.integers(1, 300_000))
            windows += stream.feed(x[i : i + step])
            i += step
        windows += stream.finish()
        peak = max(w.peak for w in windows)
        assert np.array_equal(np.stack([w.clamped(peak) for w in windows]), audio_to_windows(x, n_mels=80)), n


def test_questions_reuse_one_encoding_and_match_the_plain_path(tiny, recording, expected):
    before = tiny.backend.windows_encoded
    session = tiny.open(recording, SAMPLE_RATE)
    answers = {p: session.ask(p, sampling=GREEDY) for p in PROMPTS + ["What is the first word?"]}
    assert tiny.backend.windows_encoded - before == 4  # once, for the four windows
    assert {p: answers[p].token_ids for p in PROMPTS} == expected
    assert all(len(t) > 3 for t in expected.values()) and len({tuple(t) for t in expected.values()}) > 1
    # one prefix per task token: ASR, SQQA (both questions), SSUM
    assert len(session.prefixes) == 3
    first, again = answers["transcribe"].timings, session.ask("What is the first word?", sampling=GREEDY).timings
    assert set(first) >= {"audio_tower_s", "prefill_s", "time_to_first_token_s", "decode_s"}
    assert first["audio_tower_s"] > 0 and again["audio_tower_s"] == 0
    assert first["time_to_first_token_s"] >= first["audio_tower_s"] + first["prefill_s"]


def test_language_token_gets_its_own_prefix(tiny, recording):
    session = tiny.open(recording, SAMPLE_RATE)
    english = session.ask("transcribe", sampling=GREEDY, language="en").token_ids
    speech = SpeechTokens(session.speech.embeddings, 4, 95.0)  # encoded once: this test is about the prompt
    assert english == list(tiny.decode_tokens(tiny.prefill(speech, "transcribe", language="en"), GREEDY))
    assert len(session.prefixes) == 1 and next(iter(session.prefixes))[1] == "en"


def test_prefix_cache_from_disk_gives_the_same_tokens(tiny, recording, expected, tmp_path):
    session = tiny.open(recording, SAMPLE_RATE)
    assert {p: session.ask(p, sampling=GREEDY).token_ids for p in PROMPTS[:2]} == {p: expected[p] for p in PROMPTS[:2]}
    path = session.save(tmp_path / "talk.wav.fastslm-cache.npz")
    with zipfile.ZipFile(path) as z:  # raw arrays and a JSON header only: nothing pickled
        assert all(name.endswith(".npy") for name in z.namelist())
    before = tiny.backend.windows_encoded
    reopened = tiny.open(recording, SAMPLE_RATE, cache=path)
    assert tiny.backend.windows_encoded == before  # no audio tower
    for p in PROMPTS:  # the two cached tasks, and two built from the saved speech tokens
        assert reopened.ask(p, sampling=GREEDY).token_ids == expected[p], p
    assert tiny.backend.windows_encoded == before
    assert set(reopened.loaded_prefixes) < set(reopened.prefixes)


def rewrite_header(path: Path, edit) -> None:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    header = json.loads(bytes(arrays["header"]).decode())
    edit(header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def saved_cache(tiny, recording, tmp_path_factory) -> Path:
    session = tiny.open(recording, SAMPLE_RATE)
    session.ask("transcribe", sampling=GREEDY)
    return session.save(tmp_path_factory.mktemp("saved") / "c.npz")


@pytest.mark.parametrize("case", ["other audio", "other model", "other version", "damaged", "not a cache", "other tokens"])
def test_foreign_or_stale_cache_is_refused_in_one_line(case, tiny, saved_cache, recording, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(saved_cache.read_bytes())
    pipe, audio = tiny, recording
    if case == "other audio":
        audio = recording.copy()
        audio[123] += 0.01
    elif case == "other model":
        pipe = Pipeline(tiny.backend, tiny.tokenizer, identity="tiny-b")
    elif case == "other version":
        rewrite_header(path, lambda h: h.update(format_version=99))
    elif case == "damaged":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "not a cache":
        path.write_text("hello\n")
    elif case == "other tokens":  # the tokenizer or prompt layout changed since it was saved
        rewrite_header(path, lambda h: h["prefixes"][0]["left_ids"].append(7))
    kept = path.read_bytes()
    with pytest.raises(CacheFileError) as error:
        pipe.open(audio, SAMPLE_RATE, cache=path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "delete" in message
    assert path.read_bytes() == kept  # refused, never replaced


runner = CliRunner()


def cli(*args, **kwargs):
    return runner.invoke(run_app, [*map(str, args)], **kwargs)


def test_cli_several_prompts_cache_and_refusal(tiny_dir, recording, tmp_path):
    import soundfile as sf

    wav = tmp_path / "talk.wav"
    sf.write(wav, recording, SAMPLE_RATE, subtype="FLOAT")
    args = ["--model", tiny_dir, "--backend", "torch", "--max-new-tokens", "12", "--json", wav]
    first = cli(*args, "-p", PROMPTS[1], "-p", PROMPTS[3], "--cache")
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["prompt"] for r in records] == [PROMPTS[1], PROMPTS[3]]
    assert records[0]["timings"]["audio_tower_s"] > 0 and records[1]["timings"]["audio_tower_s"] == 0
    assert cache_path_for(wav).is_file()
    again = cli(*args, "-p", PROMPTS[3], "--cache")
    record = json.loads(again.stdout)
    assert record["text"] == records[1]["text"] and "cache_load_s" in record["timings"]

    sf.write(wav, recording * 0.5, SAMPLE_RATE, subtype="FLOAT")  # the recording changed; its cache is stale
    kept = cache_path_for(wav).read_bytes()
    stale = cli(*args, "-p", PROMPTS[1], "--cache")
    lines = [line for line in stale.stderr.splitlines() if not line.startswith("fastslm-run: model ")]
    assert stale.exit_code == 2 and len(lines) == 1 and "other audio" in lines[0] and "Traceback" not in stale.output
    assert cache_path_for(wav).read_bytes() == kept


def test_streaming_gives_the_plain_tokens(tiny, recording, expected, whole_speech):
    rng = np.random.default_rng(3)
    pcm = np.round(recording * 32768).astype(np.int16)  # as a sound card would hand it over
    as_read = load_audio(pcm, SAMPLE_RATE)
    assert np.array_equal(as_read, recording)
    live = tiny.open_stream(prepare=["What is the first word?"])
    i = 0
    while i < len(pcm):
        step = int(rng.integers(100, 250_000))
        live.feed(pcm[i : i + step])
        i += step
    session = live.finish()
    with pytest.raises(OptionError, match="finished"):
        live.feed(pcm[:100])
    assert live.reencoded_windows > 0  # the louder second in window 3 moved the clamp
    # One window at a time against batches of four: equal up to the GEMM's rounding.
    assert np.abs(session.speech.embeddings - whole_speech.embeddings).max() <= 1e-5
    for p in PROMPTS:  # the prepared task and the others, built at ask time
        assert session.ask(p, sampling=GREEDY).token_ids == expected[p], p
    assert session.audio_sha256 == samples_sha256(recording)  # so a cache saved from the stream opens the file


def test_cli_reads_pcm_from_stdin(tiny_dir, recording, tmp_path):
    import soundfile as sf

    pcm = np.round(recording[: 40 * SAMPLE_RATE] * 32768).astype("<i2")
    wav = tmp_path / "clip.wav"
    sf.write(wav, pcm, SAMPLE_RATE, subtype="PCM_16")
    args = ["--model", tiny_dir, "--backend", "torch", "--max-new-tokens", "12", "--json", "-p", "What is the first word?"]
    streamed = cli(*args, "-", input=pcm.tobytes())
    whole = cli(*args, wav)
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    a, b = json.loads(streamed.stdout), json.loads(whole.stdout)
    assert a["text"] == b["text"] and a["answer_tokens"] == b["answer_tokens"] > 0 and a["audio_seconds"] == 40.0
    bad = cli(*args, "-", input=pcm.tobytes()[:-1])
    assert bad.exit_code == 2 and "middle of a 2-byte sample frame" in bad.stderr



@pytest.mark.parametrize("fmt", ["u8", "s16le", "s24le", "s32le", "f32le", "f64le"])
def test_every_raw_pcm_format_reads_as_the_same_samples(fmt):
    """ffmpeg's -f FORMAT bytes of a 16-bit stereo recording read back as its samples (u8: to 8 bits)."""
    from fastslm.runtime.streaming import pcm_from_bytes

    pcm = np.array([[0, -1], [32767, -32768], [1234, -4321], [-77, 5]], dtype=np.int16)
    data = {
        "u8": ((pcm.astype(np.int32) >> 8) + 128).astype(np.uint8).tobytes(),
        "s16le": pcm.astype("<i2").tobytes(),
        "s24le": b"".join((int(v) * 256).to_bytes(3, "little", signed=True) for v in pcm.ravel()),
        "s32le": (pcm.astype("<i4") << 16).tobytes(),
        "f32le": (pcm / 32768).astype("<f4").tobytes(),
        "f64le": (pcm / 32768).astype("<f8").tobytes(),
    }[fmt]
    got = load_audio(pcm_from_bytes(data, fmt, 2), SAMPLE_RATE)
    want = load_audio(pcm, SAMPLE_RATE)
    assert np.abs(got - want).max() <= (2**-7 if fmt == "u8" else 0.0)
    with pytest.raises(OptionError, match="middle of a"):
        pcm_from_bytes(data[:-1], fmt, 2)


def short_context_folder(folder: Path, context: int) -> Path:
    """The tiny model with a context of `context` positions: a few minutes of audio are already past it."""
    import dataclasses

    config = tiny_config(vocab_size=512)  # room for the tokenizer's own ids and added tokens
    build_tiny_model(folder, seed=2, varied_llm=True,
                     config=dataclasses.replace(config, qwen3=dataclasses.replace(config.qwen3, max_position_embeddings=context)))
    return folder


def test_past_the_context_questions_are_answered_in_parts(tmp_path):
    folder = short_context_folder(tmp_path, 224)
    pipe = Pipeline(TorchBackend.from_folder(folder), Tokenizer.from_file(folder / "tokenizer.json"))
    # 40 windows (20 min) of speech tokens: the strategy needs no audio tower to be tested.
    speech = SpeechTokens((np.random.default_rng(0).standard_normal((40 * 5, 64)) * 0.5).astype(np.float32), 40, 1190.0)
    session = pipe.open(speech)
    sampling = SamplingOptions(max_new_tokens=8)
    for prompt in ("transcribe", "What is the first word?"):
        assert not session.fits(prompt, None, sampling.max_new_tokens)
        parts = plan_parts(session, prompt, None, sampling.max_new_tokens)
        assert parts == [(0, 20), (20, 40)]
        result = session.ask(prompt, sampling=sampling)
        assert result.strategy and ("map-reduce" in result.strategy) == (prompt != "transcribe")
        assert [(p["start"], p["end"]) for p in result.parts] == [(0.0, 600.0), (600.0, 1190.0)]
        per_part = [
            AudioSession(pipe, SpeechTokens(speech.embeddings[a * 5 : b * 5], b - a, 30.0 * (b - a)), None).ask(prompt, sampling=sampling)
            for a, b in parts
        ]
        assert [p["text"] for p in result.parts] == [r.text for r in per_part]
        assert all(r.token_ids for r in per_part)
        if prompt == "transcribe":  # joined in order
            assert result.token_ids == [t for r in per_part for t in r.token_ids]
            assert result.prompt_tokens == sum(r.prompt_tokens for r in per_part)
        else:  # reduce: one text-only turn over the partial answers
            reduce_prompt = build_text_prompt(_reduce_instruction(prompt, Task.SQQA, result.parts))
            ids = pipe.tokenizer.encode(reduce_prompt)
            assert len(ids) + 8 <= 224
            logits, cache = pipe.backend.decode(pipe.backend.embed_tokens(np.asarray(ids)), pipe.backend.empty_cache())
            assert result.token_ids == list(pipe.decode_tokens(Prefill(cache, logits, cache.length), sampling))
            assert result.prompt_tokens == sum(r.prompt_tokens for r in per_part) + len(ids)
            assert result.token_ids != per_part[0].token_ids or result.token_ids != per_part[1].token_ids


def test_cli_names_the_strategy_past_the_context(tmp_path):
    import soundfile as sf

    folder = short_context_folder(tmp_path / "model", 96)  # 9 windows fit beside the ASR prompt
    wav = tmp_path / "meeting.wav"
    sf.write(wav, np.tile(load_audio(sorted(DEMO_EVAL_SUBSET.glob("audio/*/*.flac"))[1]), 100)[: 290 * SAMPLE_RATE], SAMPLE_RATE)
    result = cli("--model", folder, "--backend", "torch", "--max-new-tokens", "8", "--json", "-p", "translate", wav)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "parts" in line]
    assert len(notes) == 1, result.stderr
    assert notes[0].startswith("fastslm-run: the recording is 4.8 min, past the model's 96-token context: translated in ")
    assert notes[0].endswith("joined in order")
    record = json.loads(result.stdout)
    assert record["strategy"] in notes[0] and f"in {len(record['parts'])} parts" in notes[0] and len(record["parts"]) > 1



def test_a_file_is_opened_in_bounded_blocks_with_the_plain_tokens(tiny, recording, tmp_path):
    """`Pipeline.open(FILE)` reads twice in blocks (peak, then windows): memory does not grow with the
    length, each window is encoded once (the loudest second is in the last window: a stream would
    repair), and the speech tokens are the whole-file path's bit for bit."""
    import tracemalloc

    import soundfile as sf

    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    pcm = np.round(recording * 32767).astype(np.int16)
    sf.write(short, pcm[: 60 * SAMPLE_RATE], SAMPLE_RATE, subtype="PCM_16")
    louder = np.tile(pcm, 7)[: 620 * SAMPLE_RATE].copy()  # 21 windows
    louder[-5 * SAMPLE_RATE :] = np.clip(louder[-5 * SAMPLE_RATE :].astype(np.int32) * 4, -32767, 32767)
    sf.write(long, louder, SAMPLE_RATE, subtype="PCM_16")

    peaks = {}
    for path in (short, long):
        before = tiny.backend.windows_encoded
        tracemalloc.start()
        session = tiny.open(path)
        peaks[path] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert tiny.backend.windows_encoded - before == session.speech.n_windows
    assert session.speech.n_windows == 21 and session.speech.seconds == 620.0
    # 560 s more audio is 36 MB more as float32 samples (72 MB as float64); the opening grows by the
    # speech tokens only (21 x 5 x 64 float32 here).
    assert peaks[long] - peaks[short] < 4e6, peaks
    assert np.array_equal(session.speech.embeddings, tiny.encode(long).embeddings)
    assert session.audio_sha256 == samples_sha256(load_audio(long))
    assert session.ask(PROMPTS[1], sampling=GREEDY).token_ids == plain(tiny, load_audio(long), [PROMPTS[1]])[PROMPTS[1]]


def test_no_length_limit_past_the_context(tiny):
    """Ten hours are answered in parts (the session holds speech tokens, not samples); only a prompt and
    answer that leave no room for audio are refused."""
    assert tiny.check_answerable(10 * 3600.0, "What was decided?", None, 16) is False
    with pytest.raises(OptionError, match="max_new_tokens"):
        tiny.check_answerable(10 * 3600.0, "What was decided?", None, tiny.backend.max_context)


@pytest.mark.parametrize("args, message", [
    (["-p", "What?", "-p", " ", "any.wav"], '--prompt is empty: give "transcribe", "summarize" or a question (no -p transcribes)'),
    (["--input-rate", "1", "-"], "--input-rate 1 is invalid: give the raw audio's rate in Hz, 1000..384000"),
    (["--input-channels", "65", "-"], "--input-channels 65 is invalid: give the raw audio's channels, 1..64"),
])  # fmt: skip
def test_cli_refuses_absurd_options_in_one_line(tiny_dir, args, message):
    result = cli("--model", tiny_dir, "--backend", "torch", *args, input=b"\0" * 64)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"fastslm-run: error: {message}"]


def test_streamed_stereo_in_chunks_smaller_than_a_frame_count_is_the_whole_array(tiny, recording):
    """(frames, channels) chunks with fewer frames than channels (a pipe may hand over one frame) stay frames."""
    pcm = np.round(recording[: 35 * SAMPLE_RATE] * 32767).astype(np.int16)
    stereo = np.stack([pcm, pcm // 3], axis=1)
    live, i, k, sizes = tiny.open_stream(prepare=()), 0, 0, [1, 2, 3, 50_000]
    while i < len(stereo):
        live.feed(stereo[i : i + sizes[k % 4]])
        i, k = i + sizes[k % 4], k + 1
    streamed, whole = live.finish(), tiny.open(stereo, SAMPLE_RATE)
    assert streamed.speech.seconds == whole.speech.seconds == 35.0
    assert streamed.audio_sha256 == whole.audio_sha256  # the very same 16 kHz mono samples
    assert np.abs(streamed.speech.embeddings - whole.speech.embeddings).max() <= 1e-5

# ---- the shipped demo model ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="the shipped demo bundle is not here")
def test_demo_model_cache_and_stream_give_the_plain_tokens(recording, tmp_path):
    pipe = Pipeline.load()  # the shipped onnx bundle
    prompts = ["transcribe", "What is the first word?"]
    sampling = SamplingOptions(max_new_tokens=24)
    expected = plain(pipe, recording, prompts, sampling)
    session = pipe.open(recording, SAMPLE_RATE)
    assert {p: session.ask(p, sampling=sampling).token_ids for p in prompts} == expected
    path = session.save(tmp_path / "demo.fastslm-cache.npz")
    reopened = pipe.open(recording, SAMPLE_RATE, cache=path)
    assert {p: reopened.ask(p, sampling=sampling).token_ids for p in prompts} == expected
    live = pipe.open_stream(prepare=prompts)
    for start in range(0, len(recording), 7 * SAMPLE_RATE):
        live.feed(recording[start : start + 7 * SAMPLE_RATE])
    streamed = live.finish()
    assert live.reencoded_windows > 0
    assert {p: streamed.ask(p, sampling=sampling).token_ids for p in prompts} == expected
    assert all(len(t) > 3 for t in expected.values())
