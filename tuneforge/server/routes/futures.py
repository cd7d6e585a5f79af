"""retrieve_future: long-poll for the result of a submitted operation.

A pending future is held up to `long_poll_seconds` (below the SDK's 45 s read timeout) and then
answered 408 "try_again", which the SDK re-polls silently. Failures are 200
`{"error", "category"}` (the SDK raises `RequestFailedError`); forward, forward_backward and
sample results are protobuf, everything else JSON.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from tinker import types

from tuneforge.errors import NotFound
from tuneforge.server import wire
from tuneforge.server.deps import JsonBody, Owner, State

router = APIRouter(prefix="/api/v1")


@router.post("/retrieve_future")
async def retrieve_future(state: State, owner: Owner, body: JsonBody) -> Response:
    req = wire.parse(types.FutureRetrieveRequest, body, "retrieve_future")
    fut = state.futures.get(req.request_id)
    if fut is None or not state.visible(fut.owner, owner):
        if state.futures.is_from_earlier_process(req.request_id):
            return JSONResponse({"error": "the server restarted after this request was "
                                          "submitted; its result is lost, submit it again",
                                 "category": "server"})
        raise NotFound(f"request_id {req.request_id!r} is not known (results are kept for "
                       f"{state.settings.result_ttl_seconds:.0f} s after completion)")
    fut = await state.futures.wait(fut, state.settings.long_poll_seconds)
    if fut.state == "pending":
        return JSONResponse(
            {"type": "try_again", "request_id": fut.request_id, "queue_state": "active"},
            status_code=408)
    if fut.state == "failed":
        return JSONResponse({"error": fut.error, "category": fut.category})
    if isinstance(fut.result, bytes):
        return Response(fut.result, media_type="application/x-protobuf")
    return JSONResponse(fut.result)
