"""A server on 127.0.0.1 inside this process (uvicorn in a thread), for the load test and tests."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import OptionError
from .engine import Engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """`with LoopbackServer(engine) as url:` serves the engine's app on a free loopback port."""

    def __init__(self, engine: Engine, start_seconds: float = 60):
        import uvicorn

        from .app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fastslm-loopback-server", daemon=True)
        self.start_seconds = start_seconds

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_seconds
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OptionError(f"the server could not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
