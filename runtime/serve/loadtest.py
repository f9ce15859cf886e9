"""`fastslm-serve-bench`: requests/s and latency percentiles of the server at several client counts.

Bounded twice (a request count and a time budget per client count) and loopback only: it
either starts its own server on 127.0.0.1 or drives one given by --url on this machine. Each
client is a thread sending requests back to back: transcriptions (`--prompt transcribe`, the
default) or chat completions asking `--prompt` about the recording. With `--cache miss` (the
default) every request's audio differs in one sample by 1e-9, so each one runs the audio tower,
as distinct recordings would; `--cache hit` sends the same bytes, so questions take the
prefix-cache path (transcription always encodes: it goes segment by segment).
"""

from __future__ import annotations

import base64
import io
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlparse

import numpy as np
import typer

from ..errors import OptionError, reported_in_one_line, run_cli
from ..prompt import Task, resolve_task

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def row(self) -> str:
        if not self.latencies:
            return f"| {self.clients} | 0 | {len(self.errors)} | - | - | - |"
        p50, p95 = np.percentile(self.latencies, [50, 95])
        rate = len(self.latencies) / self.wall_s
        return (f"| {self.clients} | {len(self.latencies)} | {len(self.errors)} | {rate:.2f} | {p50:.2f} | {p95:.2f} |")


class RequestAudio:
    """WAV bytes of the recording for each request: all the same bytes, or (distinct) each differing
    from every other in its first sample, so no request, in any level, finds another's cache entry."""

    def __init__(self, audio: Path, distinct: bool):
        from ..audio import load_audio

        self.samples, self.distinct = load_audio(audio), distinct
        self.count = 0
        self._lock = threading.Lock()
        # written once: libsndfile stamps the write time into a WAV's PEAK chunk
        self._same = None if distinct else self._wav(self.samples)

    def next(self) -> bytes:
        if self._same is not None:
            return self._same
        with self._lock:
            self.count += 1
            i = self.count
        x = self.samples.copy()
        x[0] += np.float32(1e-9 * i)
        return self._wav(x)

    @staticmethod
    def _wav(samples: np.ndarray) -> bytes:
        import soundfile as sf

        from ..audio import SAMPLE_RATE

        out = io.BytesIO()
        sf.write(out, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
        return out.getvalue()


def send(http, url: str, body: bytes, prompt: str):
    """One request: a transcription, or a chat completion asking `prompt` about the recording."""
    if resolve_task(prompt)[0] == Task.ASR:
        return http.post(f"{url}/v1/audio/transcriptions", files={"file": ("audio.wav", body)})
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(body).decode(), "format": "wav"}}
    message = {"role": "user", "content": [audio, {"type": "text", "text": prompt}]}
    return http.post(f"{url}/v1/chat/completions", json={"model": "fastslm", "messages": [message]})


def run_level(url: str, clients: int, audio: RequestAudio, prompt: str, requests: int, max_seconds: float) -> Level:
    import httpx

    level = Level(clients)
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        nonlocal issued
        with httpx.Client(timeout=max(60.0, max_seconds)) as http:
            while True:
                with lock:
                    if issued >= requests or time.perf_counter() > deadline:
                        return
                    issued += 1
                body = audio.next()
                t0 = time.perf_counter()
                try:
                    response = send(http, url, body, prompt)
                    error = None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with lock:
                    if error is None:
                        level.latencies.append(time.perf_counter() - t0)
                    else:
                        level.errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall_s = time.perf_counter() - t0
    return level


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    from .options import ServeOptions

    if not ServeOptions(host=host).loopback:
        raise OptionError(f"{url} is not on this machine: the load test only drives a server on loopback (127.0.0.1)")
    return url.rstrip("/")


@app.command()
def bench(
    audio: Annotated[Path, typer.Argument(help="Recording sent with every request.")],
    url: Annotated[Optional[str], typer.Option(help="A running server on loopback [default: start one].")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Bundle for the server it starts [default: shipped demo].")] = None,
    clients: Annotated[str, typer.Option(help="Client counts, comma-separated.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Requests per client count (at most).")] = 32,
    max_seconds: Annotated[float, typer.Option(help="Time budget per client count.")] = 120.0,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="transcribe, or a question asked by chat completion.")] = "transcribe",
    cache: Annotated[str, typer.Option(help="miss: every request a distinct recording; hit: the same bytes.")] = "miss",
    workers: Annotated[int, typer.Option(help="Worker threads of the server it starts.")] = 1,
) -> None:
    with reported_in_one_line("fastslm-serve-bench"):
        counts = parse_counts(clients)
        if requests < 1 or not max_seconds > 0:
            raise OptionError("--requests and --max-seconds must be positive")
        if cache not in ("miss", "hit"):
            raise OptionError(f"--cache {cache!r} is unknown: use miss or hit")
        if not audio.is_file():
            raise OptionError(f"audio file {audio} does not exist: check the path")
        import httpx
        sent = RequestAudio(audio, distinct=cache == "miss")
        with server_at(url, model, workers, queue_size=max(counts) * 2) as base:
            served = httpx.get(f"{base}/health", timeout=30).json()
            run_level(base, 1, sent, prompt, 1, max_seconds)  # warm-up, not counted
            levels = [run_level(base, n, sent, prompt, requests, max_seconds) for n in counts]
        load = os.getloadavg()[0]  # other work on the machine shares its cores: say how much there was
        typer.echo(f"fastslm-serve-bench: {served['model']} on {served['variant']}, {audio.name}, prompt {prompt!r}, "
                   f"cache {cache}, {requests} requests or "
                   f"{max_seconds:g} s per level, {os.cpu_count()} CPUs {platform.machine()}, "
                   f"load average {load:.1f} at the end")  # fmt: skip
        typer.echo("| clients | requests | errors | req/s | p50 s | p95 s |")
        typer.echo("|---:|---:|---:|---:|---:|---:|")
        for level in levels:
            typer.echo(level.row())
        for level in levels:
            for error in level.errors[:3]:
                typer.echo(f"fastslm-serve-bench: {level.clients} clients: {error}", err=True)


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 256:
        raise OptionError(f"--clients {text!r} is invalid: give counts from 1 to 256, e.g. 1,4,16")
    return counts


class server_at:
    """The given loopback URL, or a server started on 127.0.0.1 for the duration of the test."""

    def __init__(self, url: str | None, model: Path | None, workers: int, queue_size: int):
        self.url, self.model, self.workers, self.queue_size = url, model, workers, queue_size
        self.server = None

    def __enter__(self) -> str:
        if self.url is not None:
            return check_loopback(self.url)
        from ..generate import Pipeline
        from .engine import Engine
        from .local import LoopbackServer
        from .options import ServeOptions

        options = ServeOptions(workers=self.workers, queue_size=self.queue_size)
        self.server = LoopbackServer(Engine(Pipeline.load(self.model), options))
        return self.server.__enter__()

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.__exit__(*exc)


def main() -> None:
    run_cli(app, "fastslm-serve-bench")


if __name__ == "__main__":
    main()
