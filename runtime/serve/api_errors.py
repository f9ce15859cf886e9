"""OpenAI's error shape, so clients built for its API show our messages as they show its own.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "file", "code": "invalid_audio"}}
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-line message, OpenAI type/param/code."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def too_large(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(413, message, code="request_too_large", param=param)


def queue_full(waiting: int) -> ApiError:
    return ApiError(
        429, f"the server's queue is full ({waiting} requests waiting); retry after a moment",
        code="queue_full", type="rate_limit_error",
    )  # fmt: skip


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with the server's --api-key",
                    code="invalid_api_key")  # fmt: skip
