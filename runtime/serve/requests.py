"""The two POST bodies, checked field by field into dataclasses; each refusal names its field.

OpenAI fields this server cannot honour are refused (n > 1, word timestamps) rather than
silently ignored; fields that only steer OpenAI's own models (`model`, the transcription
`prompt`) are accepted and ignored, so existing clients work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData, UploadFile

from ..errors import FastSLMError
from ..prompt import language_token
from ..sampling import SamplingOptions
from .api_errors import bad_request
from .options import ServeOptions
from .uploads import CHAT_AUDIO_FORMATS, decode_base64_audio

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMABLE_FORMATS = ("json", "text")


@dataclass(frozen=True)
class TranscriptionRequest:
    file: UploadFile
    response_format: str
    stream: bool
    sampling: SamplingOptions
    language: str | None

    @classmethod
    def from_form(cls, form: FormData, options: ServeOptions, decoding: SamplingOptions | None = None) -> TranscriptionRequest:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise bad_request("the form has no `file` part: attach the recording as `file`", param="file")
        fmt = text_field(form, "response_format") or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            raise bad_request(f"response_format {fmt!r} is unknown: use one of {', '.join(TRANSCRIPTION_FORMATS)}",
                              param="response_format")  # fmt: skip
        stream = boolean(text_field(form, "stream") or "false", "stream")
        if stream and fmt not in STREAMABLE_FORMATS:
            raise bad_request(f"response_format {fmt} cannot be streamed: use json or text with stream=true",
                              param="stream")  # fmt: skip
        granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities") for g in form.getlist(key)]
        if "word" in granularities:
            raise bad_request("word timestamps are not available: ask for segment timestamps",
                              param="timestamp_granularities")  # fmt: skip
        temperature = number(text_field(form, "temperature") or "0", "temperature", 0.0, 1.0)
        return cls(file, fmt, stream, sampling(options, decoding, temperature=temperature),
                   language(text_field(form, "language")))


@dataclass(frozen=True)
class ChatRequest:
    audio: bytes
    audio_param: str
    prompt: str  # the last user message's text, or "transcribe" when it has none
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    language: str | None = None

    @classmethod
    def from_json(cls, body: Any, options: ServeOptions, decoding: SamplingOptions | None = None) -> ChatRequest:
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object with `messages`")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("`messages` must be a non-empty list", param="messages")
        audio, audio_param, question = [], None, None
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a `role`", param=f"messages[{i}]")
            parts = content_parts(message.get("content"), f"messages[{i}].content")
            for j, part in enumerate(parts):
                if part.get("type") == "input_audio":
                    audio_param = f"messages[{i}].content[{j}].input_audio"
                    audio.append(audio_part(part.get("input_audio"), audio_param, options))
            if message["role"] == "user":
                question = " ".join(p["text"] for p in parts if p.get("type") == "text").strip()
        if len(audio) != 1:
            raise bad_request(f"the request has {len(audio)} audio parts: send exactly one `input_audio` part "
                              "(this model answers about one recording)", param="messages")  # fmt: skip
        if body.get("n", 1) != 1:
            raise bad_request("n must be 1: this server returns one answer per request", param="n")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is None:
            limit = options.max_new_tokens
        elif isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= options.max_new_tokens:
            raise bad_request(f"max_tokens {limit!r} is invalid: use a whole number from 1 to {options.max_new_tokens}",
                              param="max_tokens")  # fmt: skip
        temperature = number(body.get("temperature", 0.0), "temperature", 0.0, 2.0)
        top_p = number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
        seed = body.get("seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("stream must be true or false", param="stream")
        stream_options = body.get("stream_options") or {}
        include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        return cls(
            audio=audio[0], audio_param=audio_param, prompt=question or "transcribe",
            sampling=sampling(options, decoding, temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=limit),
            stream=stream, include_usage=include_usage,
        )  # fmt: skip


def content_parts(content: Any, param: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param=param)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_audio"):
            raise bad_request(f"{param}[{j}] has type {kind!r}: this server takes `text` and `input_audio` parts",
                              param=f"{param}[{j}]")  # fmt: skip
        if kind == "text" and not isinstance(part.get("text"), str):
            raise bad_request(f"{param}[{j}].text must be a string", param=f"{param}[{j}].text")
    return content


def audio_part(value: Any, param: str, options: ServeOptions) -> bytes:
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object with `data` (base64) and `format`", param=param)
    fmt = value.get("format")
    if fmt not in CHAT_AUDIO_FORMATS:
        raise bad_request(f"{param}.format {fmt!r} is not supported: use one of {', '.join(CHAT_AUDIO_FORMATS)}",
                          param=f"{param}.format")  # fmt: skip
    return decode_base64_audio(value.get("data"), max_bytes=options.max_audio_bytes, param=f"{param}.data")


def text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"`{name}` must be a text field, not a file", param=name)
    return value.strip()


def boolean(value: str, name: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise bad_request(f"{name} {value!r} is not true or false", param=name)


def number(value: Any, name: str, low: float, high: float) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not low <= x <= high:
        raise bad_request(f"{name} {value!r} is invalid: use a number from {low:g} to {high:g}", param=name)
    return x


def language(value: str | None) -> str | None:
    if not value:
        return None
    try:
        language_token(value)
    except FastSLMError as exc:
        raise bad_request(str(exc), param="language") from None
    return value


def sampling(options: ServeOptions, decoding: SamplingOptions | None, **fields) -> SamplingOptions:
    """A request's options over the model's recommended decoding (`decoding`, Pipeline.sampling): a
    request at temperature 0 is read the way the model recommends, beam search included."""
    fields.setdefault("max_new_tokens", options.max_new_tokens)
    if fields.get("top_p") == 0:
        fields["temperature"] = 0.0  # top_p 0 keeps only the likeliest token: greedy
        fields["top_p"] = 1.0
    try:
        return (decoding or SamplingOptions()).replaced(**fields)
    except FastSLMError as exc:
        raise bad_request(str(exc)) from None
