"""The HTTP API: OpenAI's transcription and chat-completion endpoints over one Engine.

    GET  /health                     liveness, queue depth and cache counters (no key needed)
    GET  /v1/models                  the one model served
    POST /v1/audio/transcriptions    multipart `file`; response_format json|text|srt|vtt|verbose_json;
                                     `stream=true` -> server-sent transcript.text.delta/done events,
                                     one delta per segment
    POST /v1/chat/completions        messages with `input_audio` and text parts; `stream: true` -> SSE chunks

Any model name in a request is accepted (apps hard-code "whisper-1"): this server has one model.
Every refusal is a 4xx in OpenAI's error shape; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import subtitles
from .api_errors import ApiError, bad_request, too_large, unauthorized
from .engine import Answer, Engine, Job, Question
from .requests import ChatRequest, TranscriptionRequest
from .uploads import read_upload

log = logging.getLogger("fastslm.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app; it starts the engine's workers on startup and stops them on shutdown."""
    options = engine.options

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="fastslm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(ApiKey, key=options.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return bad_request(f"invalid request: {exc.errors()[0].get('msg', 'malformed')}").response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        return server_error().response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.get("/health")
    async def health() -> dict:
        pipe = engine.pipe
        return {"status": "ok", "model": pipe.model_name, "variant": pipe.variant, "waiting": engine.waiting,
                **engine.stats, "prefix_cache_sessions": len(engine.cache),
                "prefix_cache_mb": round(engine.cache.nbytes / 2**20, 3)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id != engine.pipe.model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; GET /v1/models lists the one that is",
                           code="model_not_found", param="model")  # fmt: skip
        return model_card(engine)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        form = await read_form(request)
        params = TranscriptionRequest.from_form(form, options, engine.pipe.sampling)
        engine.check_room()
        upload = await run_in_threadpool(read_upload, await params.file.read(), max_bytes=options.max_audio_bytes,
                                         max_seconds=options.max_audio_seconds)  # fmt: skip
        job = engine.submit(Question(upload, "transcribe", params.sampling, params.language))
        if params.stream:
            return StreamingResponse(transcription_events(request, job), media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        await finished(request, job)
        return transcription_response(params, job.answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        params = ChatRequest.from_json(await read_json(request), options, engine.pipe.sampling)
        engine.check_room()
        upload = await run_in_threadpool(read_upload, params.audio, max_bytes=options.max_audio_bytes,
                                         max_seconds=options.max_audio_seconds, param=params.audio_param)  # fmt: skip
        job = engine.submit(Question(upload, params.prompt, params.sampling, params.language))
        reply = ChatReply(engine.pipe.model_name)
        if params.stream:
            return StreamingResponse(chat_events(request, job, reply, params.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)  # fmt: skip
        await finished(request, job)
        return JSONResponse(reply.completion(job.answer))

    return app


def model_card(engine: Engine) -> dict:
    return {"id": engine.pipe.model_name, "object": "model", "created": 0, "owned_by": "fastslm"}


# ---- request bodies --------------------------------------------------------------------------


async def read_form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the recording as multipart/form-data with a `file` field", param="file")
    try:
        return await request.form(max_files=1, max_fields=64)
    except ApiError:
        raise
    except Exception as exc:  # python-multipart's parse errors, too many parts
        raise bad_request(f"the multipart body is malformed ({' '.join(str(exc).split())}): send a valid form") from None


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("the body is not valid JSON: send a chat-completion request object") from None


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while they stream in.

    The rest of a refused body is read and dropped (up to DRAIN_BYTES) before the answer: a
    server that closes on a client still sending makes the client see a connection reset
    instead of the 413 that says what to change.
    """

    DRAIN_BYTES = 256 * 2**20

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.drain(receive, 0)
            return await self.error().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await self.drain(receive, seen)
                    raise self.error()
            return message

        await self.app(scope, counted, send)

    async def drain(self, receive, seen: int) -> None:
        while seen <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def error(self) -> ApiError:
        return too_large(f"the request body is over this server's {self.max_bytes / 2**20:.1f} MiB limit: "
                         "send a shorter or compressed recording")  # fmt: skip


class ApiKey:
    """Every /v1 request needs `Authorization: Bearer KEY`; /health stays open for probes."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await unauthorized().response()(scope, receive, send)
        await self.app(scope, receive, send)


# ---- waiting for a job -----------------------------------------------------------------------


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    while not job.done:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.1)


async def finished(request: Request, job: Job) -> str:
    """Wait for the whole answer (then in job.answer); the job is cancelled if its client disconnects first."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        return await job.text()
    finally:
        watcher.cancel()
        if not job.done:
            job.cancel()


async def sse_events(request: Request, job: Job, events: AsyncIterator[dict], done: str | None) -> AsyncIterator[str]:
    """Server-sent events; an error after the headers went out becomes an error event. The job is
    cancelled when the client goes (the stream is closed) or stops reading."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        if done:
            yield f"data: {done}\n\n"
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:
        log.exception("generation failed")
        yield f"data: {json.dumps(server_error().body())}\n\n"
    finally:
        watcher.cancel()
        if not job.done:
            job.cancel()


def server_error() -> ApiError:
    return ApiError(500, "the server failed on this request (its log has the details); retry or report it",
                    code="server_error", type="server_error")  # fmt: skip


# ---- transcriptions --------------------------------------------------------------------------


def transcription_events(request: Request, job: Job) -> AsyncIterator[str]:
    async def events():
        async for piece in job.pieces():
            yield {"type": "transcript.text.delta", "delta": piece}
        yield {"type": "transcript.text.done", "text": job.answer.text}

    return sse_events(request, job, events(), done=None)


def transcription_response(params: TranscriptionRequest, answer: Answer) -> Response:
    fmt, transcript = params.response_format, answer.transcript
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n")
    if fmt in ("srt", "vtt"):  # the same files `fastslm-run --format srt|vtt` writes
        return PlainTextResponse(subtitles.render(fmt, transcript))
    usage = {"type": "duration", "seconds": round(answer.audio_seconds, 3)}
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": usage})
    segments = [{"id": i, "seek": int(round(s.start * 100)), "start": round(s.start, 3), "end": round(s.end, 3),
                 "text": s.text, "tokens": s.token_ids, "temperature": params.sampling.temperature}
                for i, s in enumerate(transcript.segments)]  # fmt: skip
    return JSONResponse({"task": "transcribe", "language": params.language or "unknown",
                         "duration": round(answer.audio_seconds, 3), "text": transcript.text, "segments": segments,
                         "usage": usage})  # fmt: skip


# ---- chat completions ------------------------------------------------------------------------


class ChatReply:
    """OpenAI chat.completion / chat.completion.chunk objects for one answer."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def completion(self, answer: Answer) -> dict:
        message = {"role": "assistant", "content": answer.text}
        return self._object("chat.completion", [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
                            usage=chat_usage(answer))  # fmt: skip

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason}])


def chat_usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}  # fmt: skip


def chat_events(request: Request, job: Job, reply: ChatReply, include_usage: bool) -> AsyncIterator[str]:
    async def events():
        yield reply.chunk({"role": "assistant", "content": ""})
        async for piece in job.pieces():
            yield reply.chunk({"content": piece})
        yield reply.chunk({}, job.answer.finish_reason)
        if include_usage:
            yield reply._object("chat.completion.chunk", [], usage=chat_usage(job.answer))

    return sse_events(request, job, events(), done="[DONE]")
