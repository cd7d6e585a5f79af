"""Sessions: create, heartbeat, finish, list, get."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from sqlalchemy import select, true
from tinker import types

from tuneforge.server.deps import JsonBody, OptionalJsonBody, Owner, State
from tuneforge.server.wire import check_metadata, parse
from tuneforge.storage.db import SamplerRow, SessionRow, TrainingRunRow, utcnow

router = APIRouter(prefix="/api/v1")


@router.post("/create_session")
def create_session(state: State, owner: Owner, body: JsonBody) -> dict:
    req = parse(types.CreateSessionRequest, body, "create_session")
    session_id = f"s-{uuid.uuid4().hex}"
    meta = check_metadata(req.user_metadata, "user_metadata")
    check_metadata({"tags": req.tags}, "tags")
    if req.display_name:
        meta.setdefault("display_name", req.display_name)
    state.db.add(SessionRow(id=session_id, owner=owner, sdk_version=req.sdk_version[:32],
                            tags=list(req.tags), user_metadata=meta))
    return {"session_id": session_id, "type": "create_session"}


@router.post("/session_heartbeat")
def heartbeat(state: State, owner: Owner, body: JsonBody) -> dict:
    req = parse(types.SessionHeartbeatRequest, body, "session_heartbeat")
    state.session(req.session_id, owner)  # 404 unknown, 410 finished (the SDK then stops)
    with state.db.session() as s:
        row = s.get(SessionRow, req.session_id)
        row.last_heartbeat = utcnow()
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish(session_id: str, state: State, owner: Owner, body: OptionalJsonBody = None) -> dict:
    state.session(session_id, owner, active=False)
    reason = (body or {}).get("reason")
    reason = reason.get("type", "success") if isinstance(reason, dict) else "success"
    state.finish_session(session_id, owner, reason)
    return {}


@router.get("/sessions")
def list_sessions(state: State, owner: Owner, limit: int = 20, offset: int = 0) -> dict:
    mine = true() if state.keys.is_admin(owner) else SessionRow.owner == owner
    rows = state.db.select(select(SessionRow).where(mine)
                           .order_by(SessionRow.created_at.desc())
                           .limit(max(0, min(limit, 1000))).offset(max(0, offset)))
    return {"sessions": [r.id for r in rows]}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, state: State, owner: Owner) -> dict:
    row = state.session(session_id, owner, active=False)
    runs = state.db.select(select(TrainingRunRow.id).where(TrainingRunRow.session_id == session_id))
    samplers = state.db.select(select(SamplerRow.id).where(SamplerRow.session_id == session_id))
    return {"training_run_ids": runs, "sampler_ids": samplers,
            "user_metadata": row.user_metadata or {},
            "display_name": (row.user_metadata or {}).get("display_name")}
