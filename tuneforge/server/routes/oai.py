"""OpenAI-compatible API under /oai/api/v1: chat completions, legacy completions and the model
list.

`POST /chat/completions` and `POST /completions` sample through the same scheduler queue and
continuous-batching decoder as Tinker `sample` (server/chat.py builds the requests). The handlers
are plain `def`s: they run on the server's worker threads, which render the prompt, submit the
request, and wait for its future without blocking the event loop.

Streaming (`stream: true`) answers OpenAI's server-sent events: `data: {chunk}` lines, then
`data: [DONE]`. It is live: the request's future carries a `TokenStream` that the decoder fills
at every step, and the stream (an async generator on the event loop, with that thread's own
tokenizer) turns each batch of new tokens into chunks (`chat_answer.TextStream`: incremental
detokenization, stop strings held back), `: keepalive` comments while nothing arrives. A client
that goes away cancels the stream, which frees the request's decoder rows at the next step. A
failure after the stream has started is sent as a `data: {"error": ...}` event.

Authentication takes `Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key`.
Errors answer in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, mapped by
this router's route class, so the Tinker routes keep their own error bodies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuneforge.errors import AuthError, NotFound, TuneforgeError
from tuneforge.scheduler.futures import Future
from tuneforge.server import chat, chat_answer, chat_request
from tuneforge.server.deps import JsonBody, State
from tuneforge.server.routes import compat
from tuneforge.server.state import ServerState

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "permission_error", 404: "invalid_request_error",
                410: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def _error_of(exc: Exception) -> tuple[int, dict]:
    if isinstance(exc, TuneforgeError):
        code = getattr(exc, "code", None)
        if isinstance(exc, AuthError):
            code = "invalid_api_key"
        elif isinstance(exc, NotFound) and code is None:
            code = "not_found"
        return exc.status, error_body(exc.status, exc.message, getattr(exc, "param", None), code)
    return compat.error_of(exc, error_body, "chat API")


router = APIRouter(prefix="/oai/api/v1", route_class=compat.route_class(_error_of))
OaiOwner = Annotated[str, Depends(compat.key_owner)]


@router.post("/chat/completions")
def chat_completions(state: State, owner: OaiOwner, body: JsonBody) -> Response:
    req = chat_request.parse(body)
    prepared = chat.prepare(state, owner, req)
    if req.stream:
        fut = chat.submit(state, owner, prepared, stream=True)
        return _sse(_stream(state, prepared, fut))
    fut = chat.submit(state, owner, prepared)
    _wait(state, fut, None)
    return JSONResponse(_completion(prepared, fut))


@router.post("/completions")
def completions(state: State, owner: OaiOwner, body: JsonBody) -> Response:
    req = chat_request.parse_completion(body)
    prepared = chat.prepare_completion(state, owner, req)
    futs = [chat.submit(state, owner, p, stream=bool(req.stream), request_type="Completion")
            for p in prepared]
    if req.stream:
        return _sse(_stream_completion(prepared, futs))
    for fut in futs:
        _wait(state, fut, None)
    tokenizer = chat.tokenizer_for_model(prepared[0])
    answers = [chat_answer.choices(tokenizer, p, chat.sequences(f))
               for p, f in zip(prepared, futs, strict=True)]
    return JSONResponse(chat_answer.text_completion(tokenizer, prepared, answers))


@router.get("/models")
def list_models(state: State, owner: OaiOwner) -> dict:
    return {"object": "list", "data": chat.list_models(state, owner)}


@router.get("/models/{model:path}")
def retrieve_model(model: str, state: State, owner: OaiOwner) -> dict:
    return chat.model_entry(state, owner, model)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)
def not_served(rest: str, request: Request) -> Response:
    raise NotFound(f"{request.method} /oai/api/v1/{rest} is not served here (served: POST "
                   "/oai/api/v1/chat/completions, POST /oai/api/v1/completions, GET "
                   "/oai/api/v1/models)")


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _wait(state: ServerState, fut: Future, timeout: float | None) -> None:
    """Block this worker thread until `fut` finishes (or `timeout` passes), waiting on the
    event loop's future store."""
    while fut.state == "pending":
        anyio.from_thread.run(state.futures.wait, fut, timeout or 60.0)
        if timeout is not None:
            return


def _completion(prepared: chat.PreparedChat, fut: Future) -> dict:
    tokenizer = chat.tokenizer_for_model(prepared)
    answer = chat_answer.choices(tokenizer, prepared, chat.sequences(fut))
    return chat_answer.completion(tokenizer, prepared, answer)


async def _stream(state: ServerState, prepared: chat.PreparedChat,
                  fut: Future) -> AsyncIterator[str]:
    """The live stream: runs on the event loop (with the loop thread's own tokenizer); the
    tokens come from the decoder as it picks them."""
    try:
        chunks = chat_answer.StreamChunks(chat.tokenizer_for_model(prepared), prepared)
        for chunk in chunks.opening():
            yield _event(chunk)
        async for event in _relay(fut, chunks):
            yield event
        try:
            seqs = chat.sequences(fut)
        except Exception as exc:  # reported in the stream, which has begun
            yield _event(_error_of(exc)[1])
            return
        for chunk in chunks.closing(seqs):
            yield _event(chunk)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream is over): free the decoder rows
        if fut.state == "pending":
            fut.stream.cancel()


async def _relay(fut: Future, chunks) -> AsyncIterator[str]:
    """The events of a future's tokens as the decoder picks them (`chunks.feed` makes the
    chunks), with keepalive comments while none come, until its stream ends."""
    async for deltas in fut.stream.abatches(KEEPALIVE_SECONDS):
        if not deltas:
            yield ": keepalive\n\n"
            continue
        for chunk in chunks.feed(deltas):
            yield _event(chunk)


async def _stream_completion(prepared: list[chat.PreparedChat],
                             futs: list[Future]) -> AsyncIterator[str]:
    """A legacy completion's live stream; with several prompts, one after the other (they are
    decoded together; the later ones' tokens wait in their streams)."""
    try:
        tokenizer = chat.tokenizer_for_model(prepared[0])
        streams = [chat_answer.CompletionChunks(tokenizer, p, i) for i, p in enumerate(prepared)]
        for fut, chunks in zip(futs, streams, strict=True):
            async for event in _relay(fut, chunks):
                yield event
        try:
            seqs = [chat.sequences(f) for f in futs]
        except Exception as exc:  # reported in the stream, which has begun
            yield _event(_error_of(exc)[1])
            return
        for chunk in streams[0].usage_chunk(prepared, seqs):
            yield _event(chunk)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream is over): free the decoder rows
        for fut in futs:
            if fut.state == "pending":
                fut.stream.cancel()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
