"""Training runs and their checkpoints (the REST surface of the SDK's RestClient)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select, true

from tuneforge.errors import Unsupported, UserError
from tuneforge.server.deps import JsonBody, Owner, State
from tuneforge.server.routes.weights import delete_checkpoint, expiry
from tuneforge.server.state import ServerState, parse_tinker_path, tinker_path
from tuneforge.storage.db import CheckpointRow, TrainingRunRow

router = APIRouter(prefix="/api/v1")

_TYPE = {"weights": "training", "sampler_weights": "sampler"}


def checkpoint_json(row: CheckpointRow) -> dict:
    return {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": _TYPE.get(row.kind, "external"),
        "time": row.created_at.isoformat(),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": False,
        "user_metadata": row.user_metadata or {},
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def run_json(state: ServerState, row: TrainingRunRow) -> dict:
    latest = {}
    for kind in ("weights", "sampler_weights"):
        found = state.db.select(
            select(CheckpointRow).where(CheckpointRow.training_run_id == row.id,
                                        CheckpointRow.kind == kind)
            .order_by(CheckpointRow.created_at.desc()).limit(1))
        latest[kind] = checkpoint_json(found[0]) if found else None
    return {
        "training_run_id": row.id,
        "base_model": row.base_model,
        "model_owner": row.owner,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": row.lora_rank,
        "last_request_time": row.last_request_time.isoformat(),
        "last_checkpoint": latest["weights"],
        "last_sampler_checkpoint": latest["sampler_weights"],
        "user_metadata": row.user_metadata or {},
        # where the run is loaded now (None: not loaded); "engine" without Ray
        "engine_worker": state.scheduler.worker_of(row.id),
    }


def page(state: ServerState, row_type, owner: str, limit: int, offset: int) -> tuple[list, dict]:
    """One page of the caller's rows of `row_type`, newest first, and its cursor."""
    if limit < 1 or limit > 1000 or offset < 0:
        raise UserError("limit must be in [1, 1000] and offset >= 0")
    where = true() if state.keys.is_admin(owner) else row_type.owner == owner
    rows = state.db.select(select(row_type).where(where)
                           .order_by(row_type.created_at.desc()).limit(limit).offset(offset))
    total = state.db.select(select(func.count()).select_from(row_type).where(where))[0]
    return rows, {"offset": offset, "limit": limit, "total_count": total}


@router.get("/training_runs")
def list_runs(state: State, owner: Owner, limit: int = 20, offset: int = 0) -> dict:
    rows, cursor = page(state, TrainingRunRow, owner, limit, offset)
    return {"training_runs": [run_json(state, r) for r in rows], "cursor": cursor}


@router.get("/training_runs/{run_id}")
def get_run(run_id: str, state: State, owner: Owner) -> dict:
    return run_json(state, state.run(run_id, owner))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, state: State, owner: Owner) -> dict:
    state.run(run_id, owner)
    rows = state.db.select(select(CheckpointRow).where(CheckpointRow.training_run_id == run_id)
                           .order_by(CheckpointRow.created_at))
    return {"checkpoints": [checkpoint_json(r) for r in rows]}


@router.get("/checkpoints")
def list_checkpoints(state: State, owner: Owner, limit: int = 100, offset: int = 0) -> dict:
    rows, cursor = page(state, CheckpointRow, owner, limit, offset)
    return {"checkpoints": [checkpoint_json(r) for r in rows], "cursor": cursor}


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete(run_id: str, kind: str, name: str, state: State, owner: Owner) -> Response:
    path = tinker_path(run_id, kind, name)
    state.checkpoint(path, owner)
    delete_checkpoint(state, path, state.paths.checkpoint(run_id, kind, name))
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
def set_ttl(run_id: str, kind: str, name: str, state: State, owner: Owner,
            body: JsonBody) -> Response:
    path = tinker_path(run_id, kind, name)
    state.checkpoint(path, owner)
    expires = expiry(body.get("ttl_seconds"))
    with state.db.session() as s:
        s.get(CheckpointRow, path).expires_at = expires
    return Response(status_code=204)


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def publish(run_id: str, kind: str, name: str, owner: Owner) -> None:
    raise Unsupported("publishing checkpoints is not supported: this server keeps every "
                      "checkpoint private to the API key that made it")


@router.post("/weights_info")
def weights_info(state: State, owner: Owner, body: JsonBody) -> dict:
    path = body.get("tinker_path")
    row = state.checkpoint(path, owner)
    run = state.run(parse_tinker_path(path)[0], owner)
    return {"base_model": run.base_model, "is_lora": True, "lora_rank": run.lora_rank,
            "train_attn": run.train_attn, "train_mlp": run.train_mlp,
            "train_unembed": run.train_unembed, "optimizer_config": {"type": "adamw"},
            "checkpoint_type": _TYPE.get(row.kind)}
