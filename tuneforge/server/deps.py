"""Shared FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Body, Depends, Request

from tuneforge.server.auth import require_key
from tuneforge.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.tf


State = Annotated[ServerState, Depends(get_state)]
Owner = Annotated[str, Depends(require_key)]
JsonBody = Annotated[dict, Body()]
OptionalJsonBody = Annotated[dict | None, Body()]


def future_answer(fut, **extra) -> dict:
    """The immediate answer to a submitted operation (an "untyped future")."""
    return {"request_id": fut.request_id, **({"model_id": fut.model_id} if fut.model_id else {}),
            **fut.extra, **extra}
