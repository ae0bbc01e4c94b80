"""The OpenAI API's shapes, sans-IO: request bodies in (validated once, into `CompletionRequest`),
response bodies, stream chunks and error bodies out.

Validation follows the OpenAI reference: a bad parameter is a 400 whose `param` names it. Fields
we do not act on (`user`, `logit_bias`, `presence_penalty`, ...) are accepted and ignored, as
llama.cpp's and vLLM's servers do, so stock clients work; `n` other than 1 is refused.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmswarm.node import config

MAX_STOP_SEQUENCES = 4  # the OpenAI API's own limit


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.retry_after_s))} if self.retry_after_s else {}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class CompletionRequest:
    """One request to /v1/chat/completions (`messages`) or /v1/completions (`prompt`), validated."""

    chat: bool
    model: str
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role + plain text content
    prompt: str = ""  # completions
    max_tokens: int = config.API_DEFAULT_MAX_TOKENS
    temperature: float = config.API_DEFAULT_TEMPERATURE
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts


def parse_request(body: Any, chat: bool, model_names: set[str]) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("`model` is required: GET /v1/models lists the model this endpoint serves", "model")
    if model not in model_names:
        raise ApiError(400, f"this endpoint serves {', '.join(sorted(model_names))}, not {model!r}: "
                       "set `model` to it (GET /v1/models)", "model", "model_not_found")
    if (n := body.get("n", 1)) not in (1, None):
        raise bad(f"n={n!r}: only n=1 is supported; send several requests instead", "n")
    messages, prompt = (_messages(body.get("messages")), "") if chat else ([], _prompt(body.get("prompt")))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream_options = body.get("stream_options") or {}
    return CompletionRequest(
        chat=chat, model=model, messages=messages, prompt=prompt,
        max_tokens=config.API_DEFAULT_MAX_TOKENS if max_tokens is None else _int(max_tokens, "max_tokens", 1),
        temperature=_number(body.get("temperature"), "temperature", 0.0, 2.0, config.API_DEFAULT_TEMPERATURE),
        top_p=_number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0),
        stop=_stop(body.get("stop")),
        seed=None if body.get("seed") is None else _int(body["seed"], "seed", None),
        stream=_bool(body.get("stream", False), "stream"),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("`messages` must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _content(value: Any, i: int) -> str:
    """A string, or a list of parts of which only text parts are understood."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise bad(f"messages[{i}].content must be text (this model reads no images or audio)", f"messages[{i}].content")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # the client library sends a one-element list as readily as a string
    if not isinstance(value, str) or not value:
        raise bad("`prompt` must be a non-empty string (one prompt per request)", "prompt")
    return value


def _int(value: Any, name: str, low: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"`{name}` must be an integer, not {value!r}", name)
    if low is not None and value < low:
        raise bad(f"`{name}` must be at least {low}, not {value}", name)
    return value


def _number(value: Any, name: str, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"`{name}` must be a number from {low:g} to {high:g}, not {value!r}", name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad(f"`{name}` must be true or false, not {value!r}", name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad(f"`stop` must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    return tuple(stops)


# -- responses -------------------------------------------------------------------------------------
@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Reply:
    """The body shapes of one answer, streamed or whole; one id and timestamp for all its chunks."""

    def __init__(self, req: CompletionRequest) -> None:
        self.req = req
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "system_fingerprint": None}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        if self.req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage.body()}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage.body()}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """One stream chunk: a piece of text, or (text None) the closing chunk with the finish reason."""
        if self.req.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage.body()}


class StopText:
    """Text pieces in, the text to show out, ending before the first `stop` string (which is never
    shown): the tail that could still begin a stop string is held back until it cannot."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
