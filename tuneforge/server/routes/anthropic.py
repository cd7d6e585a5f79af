"""Anthropic-compatible API under /anthropic/api/v1: `POST /messages`,
`POST /messages/count_tokens` and `GET /models` (point the `anthropic` client's `base_url` at
`http://HOST:PORT/anthropic/api`).

Messages are sampled through the same scheduler queue and continuous-batching decoder as Tinker
`sample` and the OpenAI endpoint (server/anthropic.py translates the request for server/chat.py).
The handlers are plain `def`s: they run on the server's worker threads, which render the prompt,
submit the request and wait for its future without blocking the event loop.

Streaming (`stream: true`) answers Anthropic's server-sent events, each with its `event:` line:
message_start, content_block_start and a ping at once, then content_block_delta (text_delta)
events live as the decoder picks tokens (a ping every 15 s while none come), content_block_stop,
message_delta (stop reason and usage) and message_stop. The deltas concatenate to exactly the
non-streamed text. A failure after the stream has started is sent as an `error` event; a client
that goes away cancels its request in the decoder.

Authentication takes `X-API-Key: <key>` or `Authorization: Bearer <key>` (the `anthropic` client
sends the latter for `api_key=`, the former with `default_headers`). The `anthropic-version` and
`anthropic-beta` headers are accepted and change nothing. Errors answer in Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}`, mapped by this router's route class, so the
Tinker routes keep their own error bodies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuneforge.errors import NotFound, TuneforgeError
from tuneforge.scheduler.futures import Future
from tuneforge.server import anthropic, chat
from tuneforge.server.deps import JsonBody, State
from tuneforge.server.routes import compat
from tuneforge.server.state import ServerState

logger = logging.getLogger(__name__)

PING_SECONDS = 15.0
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 410: "invalid_request_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error",
            "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def _error_of(exc: Exception) -> tuple[int, dict]:
    if isinstance(exc, TuneforgeError):
        return exc.status, error_body(exc.status, exc.message)
    return compat.error_of(exc, error_body, "messages API")


router = APIRouter(prefix="/anthropic/api/v1", route_class=compat.route_class(_error_of))
AnthropicOwner = Annotated[str, Depends(compat.key_owner)]


@router.post("/messages")
def create_message(state: State, owner: AnthropicOwner, body: JsonBody) -> Response:
    req = anthropic.parse(body)
    msg = anthropic.prepare(state, owner, req)
    if req.stream:
        fut = chat.submit(state, owner, msg.chat, stream=True, request_type="AnthropicMessage")
        return StreamingResponse(_stream(msg, fut), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    fut = chat.submit(state, owner, msg.chat, request_type="AnthropicMessage")
    _wait(state, fut, None)
    return JSONResponse(anthropic.message(msg, _answer(msg, fut)))


@router.post("/messages/count_tokens")
def count_tokens(state: State, owner: AnthropicOwner, body: JsonBody) -> dict:
    req = anthropic.parse(body, anthropic.CountTokensRequest)
    return {"input_tokens": anthropic.count_tokens(state, owner, req)}


@router.get("/models")
def list_models(state: State, owner: AnthropicOwner, limit: int = 20,
                after_id: str | None = None, before_id: str | None = None) -> dict:
    return anthropic.models_page(state, owner, limit, after_id, before_id)


@router.get("/models/{model:path}")
def retrieve_model(model: str, state: State, owner: AnthropicOwner) -> dict:
    return anthropic.model_info(chat.model_entry(state, owner, model))


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)
def not_served(rest: str, request: Request) -> Response:
    raise NotFound(f"{request.method} /anthropic/api/v1/{rest} is not served here (served: "
                   "POST /anthropic/api/v1/messages, POST /anthropic/api/v1/messages/"
                   "count_tokens, GET /anthropic/api/v1/models)")


def _wait(state: ServerState, fut: Future, timeout: float | None) -> None:
    """Block this worker thread until `fut` finishes (or `timeout` passes), waiting on the
    event loop's future store."""
    while fut.state == "pending":
        anyio.from_thread.run(state.futures.wait, fut, timeout or 60.0)
        if timeout is not None:
            return


def _answer(msg: anthropic.PreparedMessage, fut: Future) -> anthropic.Answer:
    tokenizer = chat.tokenizer_for_model(msg.chat)
    return anthropic.answer(tokenizer, msg, chat.sequences(fut))


async def _stream(msg: anthropic.PreparedMessage, fut: Future) -> AsyncIterator[str]:
    """The live stream: runs on the event loop (with the loop thread's own tokenizer); the
    tokens come from the decoder as it picks them."""
    try:
        tokenizer = chat.tokenizer_for_model(msg.chat)
        events = anthropic.MessageEvents(tokenizer, msg)
        for name, data in events.opening():
            yield _event(name, data)
        yield _event(*anthropic.PING)
        async for deltas in fut.stream.abatches(PING_SECONDS):
            for name, data in events.feed(deltas) if deltas else [anthropic.PING]:
                yield _event(name, data)
        try:
            closing = events.closing(tokenizer, chat.sequences(fut))
        except Exception as exc:  # reported in the stream, which has begun
            yield _event("error", _error_of(exc)[1])
            return
        for name, data in closing:
            yield _event(name, data)
    finally:  # the client went away (or the stream is over): free the decoder rows
        if fut.state == "pending":
            fut.stream.cancel()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
