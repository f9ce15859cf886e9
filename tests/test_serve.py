"""fastslm-serve on loopback with the shipped demo model, driven by the official `openai` client.

One server is `fastslm-serve` itself in a child process (the command users run); a second one,
with a one-place queue and an API key, runs in this process so its queue can be filled on purpose. Expected answers come from `fastslm-run` and the Pipeline directly:
the server must give the same text token for token.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fastslm.runtime import subtitles
from fastslm.runtime.audio import SAMPLE_RATE, load_audio
from fastslm.runtime.cli import app as run_app
from fastslm.runtime.errors import OptionError
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEMO_EVAL_SUBSET
from fastslm.runtime.sampling import SamplingOptions
from fastslm.runtime.serve.engine import Engine, Question
from fastslm.runtime.serve.local import LoopbackServer, free_port
from fastslm.runtime.serve.options import ServeOptions
from fastslm.runtime.serve.uploads import read_upload
from fastslm.runtime.transcribe import Transcript, transcribe

MAX_AUDIO_MB = 4  # the child server's byte bound (jfk.flac is 1.1 MB)
MAX_AUDIO_SECONDS = 120  # and its length bound
QUESTION = "What is the first word?"


def wait_healthy(url: str, seconds: float = 90, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"fastslm-serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy in {seconds} s")


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


@pytest.fixture(scope="module")
def clips(jfk_path) -> dict[str, Path]:
    """jfk.flac and three shipped eval clips: different recordings, so a mixed-up answer shows."""
    rows = [json.loads(line) for line in (DEMO_EVAL_SUBSET / "eval_seen.jsonl").read_text().splitlines()[:3]]
    return {"jfk": jfk_path, **{row["id"]: DEMO_EVAL_SUBSET / row["path"] for row in rows}}


@pytest.fixture(scope="module")
def transcripts(pipe, clips) -> dict[str, Transcript]:
    """What `fastslm-run` gives for each clip: segment-by-segment transcription."""
    return {name: transcribe(pipe, path) for name, path in clips.items()}


@pytest.fixture(scope="module")
def two_utterances(jfk_path, clips, tmp_path_factory) -> Path:
    """jfk.flac, 3 s of silence, one eval clip: two segments for the pause-cutting transcriber."""
    samples = [load_audio(jfk_path), np.zeros(3 * SAMPLE_RATE, np.float32), load_audio(clips["eval_seen-000004"])]
    path = tmp_path_factory.mktemp("audio") / "two.flac"
    sf.write(path, np.concatenate(samples), SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`fastslm-serve` in a child process on 127.0.0.1 and a free port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-c", "from fastslm.runtime.serve.cli import main; main()", "--port", str(port),
               "--max-audio-mb", str(MAX_AUDIO_MB), "--max-audio-seconds", str(MAX_AUDIO_SECONDS)]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process=process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def wav_bytes(path: Path) -> bytes:
    out = io.BytesIO()
    # float WAV at 16 kHz holds load_audio's samples exactly, so answers match those for the file
    sf.write(out, load_audio(path), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return out.getvalue()


def chat_audio(data: bytes, text: str | None, fmt: str = "wav") -> list[dict]:
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


# ---- the openai client gets fastslm-run's answers ------------------------------------------------


def test_transcription_equals_fastslm_run(client, two_utterances):
    result = CliRunner().invoke(run_app, [str(two_utterances), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(record["segments"]) == 2 and record["text"]

    with open(two_utterances, "rb") as f:
        plain = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert plain.text == record["text"]

    with open(two_utterances, "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == 2  # one event per segment, sent as each is decoded
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == record["text"] == "".join(deltas)


def test_transcription_response_formats(client, clips, transcripts):
    name = "eval_seen-000000"  # a short clip: four formats, four requests
    expected = transcripts[name]

    def create(fmt: str):
        with open(clips[name], "rb") as f:
            return client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)

    assert create("text") == expected.text + "\n"
    assert create("srt") == subtitles.render("srt", expected)
    assert create("vtt") == subtitles.render("vtt", expected)
    verbose = create("verbose_json")
    assert verbose.text == expected.text
    assert verbose.duration == pytest.approx(sf.info(clips[name]).duration, abs=0.01)
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (round(s.start, 3), round(s.end, 3), s.text) for s in expected.segments]
    assert verbose.segments[0].tokens == expected.segments[0].token_ids


def test_chat_completion_with_input_audio(client, pipe, jfk_path, transcripts):
    data = wav_bytes(jfk_path)
    reply = client.chat.completions.create(model="fastslm", messages=chat_audio(data, "Transcribe the audio."))
    assert reply.choices[0].message.content == transcripts["jfk"].text  # a transcription, as fastslm-run's
    assert reply.choices[0].finish_reason == "stop"

    reference = pipe.generate(jfk_path, QUESTION)
    reply = client.chat.completions.create(model="fastslm", messages=chat_audio(data, QUESTION))
    assert reply.choices[0].message.content == reference.text
    assert reply.usage.prompt_tokens == reference.prompt_tokens
    assert reply.usage.completion_tokens == len(reference.token_ids)

    chunks = list(client.chat.completions.create(model="fastslm", messages=chat_audio(data, QUESTION), stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == reference.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(reference.token_ids)

    short = client.chat.completions.create(model="fastslm", messages=chat_audio(data, "summarize"), max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2


def test_second_question_about_the_same_audio_skips_encoding(server, client, jfk_path):
    data = wav_bytes(jfk_path) + b""  # the cache key is the uploaded bytes
    client.chat.completions.create(model="fastslm", messages=chat_audio(data, QUESTION))
    before = health(server)
    reply = client.chat.completions.create(model="fastslm", messages=chat_audio(data, "Who is speaking?"))
    after = health(server)
    assert reply.choices[0].message.content
    assert after["audio_encoded"] == before["audio_encoded"]
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1



def test_prefix_cache_is_bounded_by_bytes():
    """Least recently used sessions go first, counted in bytes, again after a question adds a prefix."""
    import threading

    from fastslm.runtime.generate import SpeechTokens
    from fastslm.runtime.kv_cache import KVCache
    from fastslm.runtime.prompt import Task
    from fastslm.runtime.serve.engine import CachedSession, PrefixCache
    from fastslm.runtime.session import AudioSession

    mb = 2**20

    def entry(megabytes: float) -> CachedSession:
        speech = SpeechTokens(np.zeros((int(megabytes * mb) // 256, 64), np.float32), 1, 30.0)
        return CachedSession(AudioSession(None, speech, None), threading.Lock())

    cache = PrefixCache(3 * mb)
    a, b, c, d = entry(1), entry(1), entry(1), entry(1)
    for key, item in zip("abc", (a, b, c)):
        cache.put(key, item)
    assert len(cache) == 3 and cache.nbytes == 3 * mb
    assert cache.get("a") is a  # now the most recent
    cache.put("d", d)
    assert [k for k in "abcd" if cache.get(k)] == ["a", "c", "d"] and cache.nbytes == 3 * mb
    half = np.zeros((1, 2, 1024, 64), np.float32)  # 0.5 MiB per array
    a.session.prefixes[(Task.SQQA, None)] = KVCache([half], [half])  # a question built a 1 MiB prefix
    cache.recount("a", a)
    # order was a, c, d (the gets above); a re-counted at 2 MiB goes last and c, now the oldest, is dropped
    assert a.nbytes == 2 * mb and cache.nbytes == 3 * mb and len(cache) == 2
    assert cache.get("c") is None and cache.get("d") is d and cache.get("a") is a
    cache.put("big", entry(3.5))  # larger than the whole bound: not kept, nothing dropped for it
    assert cache.get("big") is None and cache.nbytes <= 3 * mb and cache.get("a") is a
    empty = PrefixCache(0)
    empty.put("a", entry(0.001))
    assert len(empty) == 0 and empty.nbytes == 0


def test_sixteen_concurrent_clients(server, client, pipe, clips, transcripts):
    """Each clip transcribed once and asked about three times (two from the prefix cache), all at once."""
    names = list(clips)
    encoded = {name: wav_bytes(path) for name, path in clips.items()}
    answers = {name: pipe.generate(path, QUESTION).text for name, path in clips.items()}

    def one(i: int) -> tuple[str, str, str]:
        name = names[i % len(names)]
        if i < len(names):
            with open(clips[name], "rb") as f:
                return name, client.audio.transcriptions.create(model="whisper-1", file=f).text, transcripts[name].text
        reply = client.chat.completions.create(model="fastslm", messages=chat_audio(encoded[name], QUESTION))
        return name, reply.choices[0].message.content, answers[name]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for name, got, want in results:
        assert got == want, name
    assert health(server)["failed"] == 0


# ---- bad requests get 4xx in OpenAI's shape, and the server keeps serving ------------------------


def silent_flac(seconds: float) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * SAMPLE_RATE), np.float32), SAMPLE_RATE, format="FLAC")
    return out.getvalue()


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, jfk_path, transcripts):
    jfk = jfk_path.read_bytes()
    url = f"{server}/v1/audio/transcriptions"
    chat = f"{server}/v1/chat/completions"
    oversized = os.urandom(MAX_AUDIO_MB * 2**20 + 1)
    cases = [  # (name, status, code, request)
        ("oversized upload", 413, "request_too_large", lambda: httpx.post(url, files={"file": ("a.flac", oversized)})),
        ("too long", 400, "audio_too_long",
         lambda: httpx.post(url, files={"file": ("a.flac", silent_flac(MAX_AUDIO_SECONDS + 30))})),
        ("corrupt flac", 400, "invalid_audio", lambda: httpx.post(url, files={"file": ("a.flac", jfk[: len(jfk) // 2])})),
        ("flac header only", 400, "invalid_audio", lambda: httpx.post(url, files={"file": ("a.flac", jfk[:200])})),
        ("not audio", 400, "invalid_audio", lambda: httpx.post(url, files={"file": ("notes.txt", b"hello, world\n" * 50)})),
        ("empty file", 400, "invalid_audio", lambda: httpx.post(url, files={"file": ("a.wav", b"")})),
        ("no file", 400, None, lambda: httpx.post(url, data={"model": "whisper-1"}, files={"x": ("x", b"1")})),
        ("not multipart", 400, None, lambda: httpx.post(url, json={"file": "jfk.flac"})),
        ("bad format", 400, None, lambda: httpx.post(url, files={"file": ("a.flac", jfk)}, data={"response_format": "mp4"})),
        ("streamed verbose", 400, None, lambda: httpx.post(
            url, files={"file": ("a.flac", jfk)}, data={"response_format": "verbose_json", "stream": "true"})),
        ("word timestamps", 400, None, lambda: httpx.post(
            url, files={"file": ("a.flac", jfk)}, data={"timestamp_granularities[]": "word"})),
        ("bad language", 400, None, lambda: httpx.post(url, files={"file": ("a.flac", jfk)}, data={"language": "xx"})),
        ("chat: invalid json", 400, None, lambda: httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})),
        ("chat: no audio", 400, None, lambda: httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}]})),
        ("chat: bad base64", 400, None, lambda: httpx.post(chat, json={"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "***", "format": "wav"}}]}]})),
        ("chat: not audio", 400, "invalid_audio", lambda: httpx.post(chat, json={"messages": chat_audio(b"text, not sound", None)})),
        ("chat: unknown format", 400, None, lambda: httpx.post(chat, json={"messages": chat_audio(jfk, None, fmt="aac")})),
        ("chat: max_tokens 0", 400, None, lambda: httpx.post(chat, json={"messages": chat_audio(jfk, None), "max_tokens": 0})),
        ("chat: oversized body", 413, "request_too_large", lambda: httpx.post(
            chat, content=b"x" * (ServeOptions(max_audio_bytes=MAX_AUDIO_MB * 2**20).max_body_bytes + 1))),
        ("unknown route", 404, "not_found", lambda: httpx.get(f"{server}/v1/nothing")),
    ]  # fmt: skip
    for name, status, code, request in cases:
        response = request()
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["message"] and "\n" not in error["message"] and error["type"], name
        if code:
            assert error["code"] == code, (name, error)

    with pytest.raises(openai.BadRequestError, match="not audio"):
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"hello"))
    with open(jfk_path, "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=f).text == transcripts["jfk"].text
    assert health(server)["failed"] == 0


# ---- queue bound, API key, disconnects ------------------------------------------------------------


def wait_for(url: str, condition, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = health(url)
        if condition(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting; last health: {state}")


def test_full_queue_gets_429_key_is_required_and_disconnects_cancel(jfk_path):
    options = ServeOptions(queue_size=1, workers=1, api_key="sesame", max_audio_seconds=600)
    # A question about 4 min = 8 windows encoded one at a time: the worker is busy long enough to
    # fill the queue, and a cancelled encoding stops after the window in progress
    pipe = Pipeline.load(max_windows_per_batch=1)
    long_audio = io.BytesIO()
    samples = np.concatenate([load_audio(jfk_path), np.zeros(229 * SAMPLE_RATE, np.float32)])
    sf.write(long_audio, samples, SAMPLE_RATE, format="FLAC")
    body = {"messages": chat_audio(long_audio.getvalue(), QUESTION, fmt="flac"), "stream": True}
    auth = {"Authorization": "Bearer sesame"}
    with LoopbackServer(Engine(pipe, options)) as url:
        endpoint = f"{url}/v1/chat/completions"
        refused = httpx.post(endpoint, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(endpoint, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key

        with httpx.Client(timeout=120, headers=auth) as first, httpx.Client(timeout=120, headers=auth) as second:
            with first.stream("POST", endpoint, json=body) as running:
                assert running.status_code == 200
                wait_for(url, lambda s: s["running"] == 1)
                with second.stream("POST", endpoint, json=body) as waiting:
                    assert waiting.status_code == 200
                    assert health(url)["waiting"] == 1
                    full = httpx.post(endpoint, json=body, headers=auth)
                    assert full.status_code == 429, full.text
                    assert full.json()["error"]["code"] == "queue_full"
                # `waiting` closed before it started, `running` closes while it encodes
        state = wait_for(url, lambda s: s["running"] == 0 and s["waiting"] == 0 and s["cancelled"] == 2)
        assert state["completed"] == 0 and state["audio_encoded"] == 0  # neither finished its audio tower

        with open(jfk_path, "rb") as f:  # and it still answers
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
            assert client.audio.transcriptions.create(model="whisper-1", file=f).text == transcribe(pipe, jfk_path).text


class CountingBackend:
    """The real backend, counting the LLM's decode calls (a prefill or one answer token each)."""

    def __init__(self, backend):
        self.backend, self.decodes = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def decode(self, embeds, cache):
        self.decodes += 1
        return self.backend.decode(embeds, cache)


def test_engine_stops_when_its_client_is_gone(pipe, jfk_path, two_utterances):
    counting = CountingBackend(pipe.backend)
    engine = Engine(Pipeline(counting, pipe.tokenizer, model_name=pipe.model_name), ServeOptions())
    cancelled = threading.Event()
    pieces = []

    def emit(piece: str) -> None:  # the client goes away right after the first piece
        pieces.append(piece)
        cancelled.set()

    # A question stops between tokens. The demo model answers questions in a few tokens, so the long
    # answer here is a transcription asked of the session in one prefill (engine._ask, not segments).
    question = Question(read_upload(jfk_path.read_bytes(), max_bytes=2**25, max_seconds=60), "transcribe",
                        SamplingOptions())  # fmt: skip
    full = engine._ask(question, lambda piece: None, threading.Event())
    assert full.finish_reason == "stop" and full.completion_tokens > 20
    counting.decodes = 0
    stopped = engine._ask(question, emit, cancelled)
    assert stopped.finish_reason == "cancelled" and stopped.audio_cached
    assert len(pieces) == 1 and full.text.startswith(pieces[0])
    # the question's own tokens and a token or two: neither the audio prefix again (3 calls) nor the 40-token answer
    assert counting.decodes <= 3

    # a transcription stops between segments
    cancelled.clear()
    pieces.clear()
    upload = read_upload(two_utterances.read_bytes(), max_bytes=2**25, max_seconds=60)
    stopped = engine.answer(Question(upload, "transcribe", SamplingOptions()), emit, cancelled)
    assert stopped.finish_reason == "cancelled"
    assert len(stopped.transcript.segments) == 1 and pieces == [stopped.transcript.text]


@pytest.mark.parametrize("body, beam_size, temperature", [
    ({}, 4, 0.0),  # the OpenAI default, temperature 0: the model's recommended beam search
    ({"temperature": 0.5}, 1, 0.5),  # sampling asked for: no beams
    ({"top_p": 0}, 4, 0.0),  # top_p 0 means greedy-like: the model's deterministic decoding
])
def test_requests_are_read_the_way_the_model_recommends(jfk_path, body, beam_size, temperature):
    from fastslm.runtime.serve.requests import ChatRequest

    messages = chat_audio(jfk_path.read_bytes(), "transcribe", "flac")
    got = ChatRequest.from_json({"messages": messages, **body}, ServeOptions(), SamplingOptions(beam_size=4)).sampling
    assert (got.beam_size, got.temperature, got.max_new_tokens) == (beam_size, temperature, ServeOptions().max_new_tokens)
    assert ChatRequest.from_json({"messages": messages, **body}, ServeOptions()).sampling.beam_size == 1  # none: greedy


def test_options_refuse_absurd_values():
    for bad in ({"port": 0}, {"workers": 0}, {"queue_size": -1}, {"max_audio_seconds": float("nan")},
                {"api_key": " "}, {"prefix_cache_mb": -1},
                {"prefix_cache_mb": float("inf")}):  # fmt: skip
        with pytest.raises(OptionError):
            ServeOptions(**bad)
    assert ServeOptions().loopback and ServeOptions(host="::1").loopback and not ServeOptions(host="0.0.0.0").loopback


def test_serve_cli_refuses_bad_options_in_one_line():
    result = subprocess.run([sys.executable, "-c", "from fastslm.runtime.serve.cli import main; main()", "--workers", "0"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fastslm-serve: error: workers 0 is invalid: use a whole number >= 1"]


def test_load_test_reports_rates_and_percentiles(server, clips):
    from fastslm.runtime.serve.loadtest import app as bench_app

    before = health(server)
    result = CliRunner().invoke(bench_app, [str(clips["eval_seen-000000"]), "--url", server, "--clients", "1,2",
                                            "--requests", "2", "--max-seconds", "60", "--prompt", QUESTION,
                                            "--cache", "hit"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2]
    for clients, requests, errors, rate, p50, p95 in rows:
        assert int(requests) == 2 and int(errors) == 0
        assert float(rate) > 0 and 0 < float(p50) <= float(p95)
    # --cache hit sends the very same bytes: all but the first of the 5 questions (warm-up included) hit
    assert health(server)["prefix_cache_hits"] - before["prefix_cache_hits"] >= 4

    refused = CliRunner().invoke(bench_app, [str(clips["jfk"]), "--url", "http://192.0.2.1:8000"])
    assert refused.exit_code == 2
    assert "only drives a server on loopback" in refused.output


def test_server_imports_no_torch():
    code = ("import sys\n"
            "from fastslm.runtime.generate import Pipeline\n"
            "from fastslm.runtime.serve import app, cli, engine, loadtest, options\n"
            "app.create_app(engine.Engine(Pipeline.load(), options.ServeOptions()))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
