"""The HTTP side of `llmswarm api`: a Starlette app (ASGI, on anyio, so it runs on trio under
hypercorn's trio worker) with the OpenAI routes, the swarm page and its data.

    GET  /                      the live swarm page (page.html, shipped in this package)
    GET  /v1/swarm              what `status --json` prints, refreshed every API_SWARM_PERIOD_S, and
                                under "api" this endpoint's requests in flight and head batches
    GET  /v1/models             the model this endpoint serves
    POST /v1/chat/completions   messages -> answer (the model's chat template); `stream` for SSE
    POST /v1/completions        prompt -> continuation; `stream` for SSE

A completion is its own ASGI response (`Completion`): it holds a --max-concurrent slot and a swarm
session for exactly as long as the client is there. A task watches for `http.disconnect` and
cancels the answer, and the session's close (in node/client/session.py's `finally`) frees every
server's cache. Until the first byte is sent a failure is a plain OpenAI-style error with its status
(503 + Retry-After when no route covers the model); after it, an SSE `error` event ends the stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import trio
from llmswarm.node.api.protocol import ApiError, CompletionRequest, Reply, parse_request
from llmswarm.node.api.sessions import SwarmBackend
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

OPEN_PATHS = ("/", "/v1/swarm")  # what `status` shows anyone who can reach a bootstrap peer: no key
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def sse(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


class Completion:
    """One answer, streamed or whole, as an ASGI response that owns its slot and its swarm session."""

    def __init__(self, backend: SwarmBackend, req: CompletionRequest, ids: list[int]) -> None:
        self.backend, self.req, self.ids = backend, req, ids
        self.reply = Reply(req)
        self.started = False  # response headers sent: errors can only go into the stream now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
            try:
                async with self.backend.slot():
                    await self._answer(send)
            except ApiError as e:
                await self._fail(send, e)
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()  # the client hung up: stop generating, close the session

    async def _answer(self, send: Send) -> None:
        if not self.req.stream:
            answer = await self.backend.complete(self.req, self.ids, _ignore)
            await send_json(send, 200, self.reply.whole(answer.text, answer.finish_reason, answer.usage))
            return
        first = True

        async def emit(piece: str) -> None:
            nonlocal first
            if not self.started:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                self.started = True
            await send({"type": "http.response.body", "body": sse(self.reply.chunk(piece, first=first)),
                        "more_body": True})
            first = False

        answer = await self.backend.complete(self.req, self.ids, emit)
        if first:
            await emit("")  # no text at all (a stop token first): the role chunk still opens the stream
        body = sse(self.reply.chunk(None, answer.finish_reason))
        if self.req.include_usage:
            body += sse(self.reply.usage_chunk(answer.usage))
        await send({"type": "http.response.body", "body": body + sse("[DONE]"), "more_body": False})

    async def _fail(self, send: Send, e: ApiError) -> None:
        if not self.started:
            await send_json(send, e.status, e.body(), e.headers())
            return
        await send({"type": "http.response.body", "body": sse(e.body()), "more_body": False})


async def _ignore(_piece: str) -> None:
    return None


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class BearerAuth:
    """--api-key: every route but OPEN_PATHS needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {self.key}":
                e = ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with the "
                             "key given to `llmswarm api --api-key`", code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(backend: SwarmBackend, swarm: Callable[[], dict[str, Any]], api_key: str | None = None) -> Any:
    """The ASGI app. `swarm()` returns the latest status snapshot (node/discovery/status.py)."""
    page = resources.files("llmswarm.node.api").joinpath("page.html").read_text(encoding="utf-8")

    async def index(_: Request) -> Response:
        return HTMLResponse(page)

    async def swarm_data(_: Request) -> Response:
        return JSONResponse(swarm())

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(n) for n in sorted(backend.model_names)]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in backend.model_names:
            raise ApiError(404, f"this endpoint serves {', '.join(sorted(backend.model_names))}, not {name!r}",
                           "model", "model_not_found")
        return JSONResponse(_model_card(name))

    def completions(chat: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Any:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
            req = parse_request(body, chat, backend.model_names)
            return Completion(backend, req, backend.prompt_ids(req))

        return endpoint

    async def api_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return error_response(e)

    async def http_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        return error_response(ApiError(e.status_code, f"{e.detail}: see GET /v1/models and POST "
                                       "/v1/chat/completions", code="not_found" if e.status_code == 404 else None))

    routes = [Route("/", index), Route("/v1/swarm", swarm_data), Route("/v1/models", models),
              Route("/v1/models/{name:path}", model),
              Route("/v1/chat/completions", completions(True), methods=["POST"]),
              Route("/v1/completions", completions(False), methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
    return BearerAuth(app, api_key) if api_key else app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmswarm"}
