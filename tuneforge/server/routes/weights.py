"""Weights: save_weights (save_state), save_weights_for_sampler, load_weights."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from tinker import types

from tuneforge.engine.worker import EngineWorker
from tuneforge.errors import NotFound, Unsupported, UserError
from tuneforge.scheduler.queue import Work
from tuneforge.server import wire
from tuneforge.server.deps import JsonBody, Owner, State, future_answer
from tuneforge.server.routes.training import (
    check_optimizer_config,
    gradient_checkpointing,
    lora_options,
    model_id_for,
    register_run,
)
from tuneforge.server.state import ServerState, parse_tinker_path, tinker_path
from tuneforge.storage import checkpoints
from tuneforge.storage.db import CheckpointRow, SamplerRow, TrainingRunRow, utcnow
from tuneforge.storage.paths import check_name

router = APIRouter(prefix="/api/v1")

MIN_TTL, MAX_TTL = 3600, 10 * 365 * 86400


def expiry(ttl_seconds: int | None) -> dt.datetime | None:
    """When a checkpoint with this TTL expires (None: never)."""
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) \
            or not MIN_TTL <= ttl_seconds <= MAX_TTL:
        raise UserError(f"ttl_seconds must be an integer between {MIN_TTL} and {MAX_TTL}, "
                        f"got {ttl_seconds!r}")
    return utcnow() + dt.timedelta(seconds=ttl_seconds)


def save_checkpoint(state: ServerState, engine: EngineWorker, owner: str, model_id: str,
                    kind: str, name: str | None, ttl_seconds: int | None, overwrite: bool,
                    user_metadata: dict | None) -> str:
    """Write a checkpoint of `model_id` and record it; returns its tinker:// path."""
    if name is None:
        name = f"step-{engine.model_info(model_id).steps:06d}"
    name = check_name(name)
    expires = expiry(ttl_seconds)
    user_metadata = wire.check_metadata(user_metadata, "user_metadata")
    folder = state.paths.checkpoint(model_id, kind, name)
    path = tinker_path(model_id, kind, name)
    if state.db.get(CheckpointRow, path) is not None or folder.exists():
        if not overwrite:
            raise UserError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        delete_checkpoint(state, path, folder)
    size = engine.save(model_id, folder, kind, name, user_metadata)
    state.db.add(CheckpointRow(
        tinker_path=path, training_run_id=model_id, owner=owner, kind=kind, name=name,
        size_bytes=size, user_metadata=user_metadata, expires_at=expires))
    return path


def delete_checkpoint(state: ServerState, path: str, folder) -> None:
    with state.db.session() as s:
        row = s.get(CheckpointRow, path)
        if row is not None:
            s.delete(row)
    checkpoints.remove(folder)


@router.post("/save_weights")
def save_weights(state: State, owner: Owner, body: JsonBody) -> dict:
    model_id, seq_id = wire.ordered_envelope(body, "save_weights")

    def job(engine: EngineWorker) -> dict:
        req = wire.parse(types.SaveWeightsRequest, body, "save_weights")
        path = save_checkpoint(state, engine, owner, model_id, "weights", req.path,
                               req.ttl_seconds, req.overwrite, req.user_metadata)
        return {"path": path, "type": "save_weights"}

    return future_answer(state.submit_for_model(owner, model_id, seq_id, "SaveWeights", job))


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(state: State, owner: Owner, body: JsonBody) -> dict:
    model_id, seq_id = wire.ordered_envelope(body, "save_weights_for_sampler")

    def job(engine: EngineWorker) -> dict:
        req = wire.parse(types.SaveWeightsForSamplerRequest, body, "save_weights_for_sampler")
        if req.path is not None:
            path = save_checkpoint(state, engine, owner, model_id, "sampler_weights", req.path,
                                   req.ttl_seconds, True, req.user_metadata)
            return {"path": path, "type": "save_weights_for_sampler"}
        if req.sampling_session_seq_id is None:
            raise UserError("save_weights_for_sampler: either path or sampling_session_seq_id "
                            "is required")
        run = state.run(model_id, owner)
        sampler_id = f"{run.session_id}:sample:{req.sampling_session_seq_id}"
        if state.db.get(SamplerRow, sampler_id) is not None:
            raise UserError(f"sampling_session_seq_id {req.sampling_session_seq_id} is already "
                            f"used in session {run.session_id}")
        engine.add_sampler_snapshot(sampler_id, model_id)
        state.scheduler.place_sampler(sampler_id, model_id)  # its samples run beside the model
        state.db.add(SamplerRow(id=sampler_id, session_id=run.session_id, owner=owner,
                                base_model=run.base_model, source="snapshot"))
        return {"sampling_session_id": sampler_id, "path": None,
                "type": "save_weights_for_sampler"}

    fut = state.submit_for_model(owner, model_id, seq_id, "SaveWeightsForSampler", job)
    return future_answer(fut)


@router.post("/save_weights_external")
def save_weights_external(state: State, owner: Owner, body: JsonBody) -> dict:
    model_id, seq_id = wire.ordered_envelope(body, "save_weights_external")

    def job(engine: EngineWorker) -> dict:
        req = wire.parse(types.SaveWeightsExternalRequest, body, "save_weights_external")
        if req.age_encryption_recipients:
            raise Unsupported("save_weights_external: age_encryption_recipients is not "
                              "supported (exports are written unencrypted to the data directory)")
        path = save_checkpoint(state, engine, owner, model_id, "external_weights", req.path,
                               req.ttl_seconds, True, None)
        size = state.db.get(CheckpointRow, path).size_bytes
        return {"path": path, "size_bytes": size, "type": "save_weights_external"}

    fut = state.submit_for_model(owner, model_id, seq_id, "SaveWeightsExternal", job)
    return future_answer(fut)


@router.post("/load_weights")
def load_weights(state: State, owner: Owner, body: JsonBody) -> dict:
    req = wire.parse(types.LoadWeightsRequest, body, "load_weights")
    row = state.checkpoint(req.path, owner)
    if row.kind != "weights":
        raise UserError(f"load_weights: {req.path} is a {row.kind} checkpoint; only training "
                        "checkpoints (tinker://…/weights/…) hold what a training model needs")
    folder = state.paths.checkpoint(*parse_tinker_path(req.path))
    if req.session_id is not None:
        return _create_via_load(state, owner, req, folder)
    if req.model_id is None or req.seq_id is None:
        raise UserError("load_weights: give session_id and model_seq_id (new model), or "
                        "model_id and seq_id (existing model)")
    model_id = req.model_id

    def job(engine: EngineWorker) -> dict:
        engine.load_into(model_id, folder, req.optimizer)
        return {"model_id": model_id, "path": req.path, "type": "load_weights"}

    return future_answer(state.submit_for_model(owner, model_id, req.seq_id, "LoadWeights", job))


def _create_via_load(state: ServerState, owner: str, req: types.LoadWeightsRequest,
                     folder) -> dict:
    if req.model_seq_id is None:
        raise UserError("load_weights: model_seq_id is required with session_id")
    state.session(req.session_id, owner)
    check_optimizer_config(req.optimizer_config)
    metadata = wire.check_metadata(req.user_metadata, "user_metadata")
    checkpoint = gradient_checkpointing(metadata)
    # the checkpoint's alpha and dropout unless asked otherwise (only dropout may change)
    options = lora_options(metadata)
    model_id = model_id_for(req.session_id, req.model_seq_id)

    def submit():
        fut = state.futures.create("LoadWeights", owner, model_id)
        lane = req.base_model or state.db.get(TrainingRunRow, parse_tinker_path(req.path)[0]
                                              ).base_model
        # the load is seq 0; the client continues at 1
        state.scheduler.open_model(model_id, lane)

        def job(engine: EngineWorker) -> dict:
            if not folder.exists():
                raise NotFound(f"checkpoint {req.path} has no files on this server")
            state.check_model_quota(owner)
            info = engine.load_model(model_id, folder, req.optimizer, req.base_model,
                                     checkpoint, **options)
            register_run(state, engine, info, req.session_id, owner, req.user_metadata)
            return {"model_id": model_id, "path": req.path, "type": "load_weights"}

        return state.scheduler.submit(fut, Work(lane=lane, model_id=model_id, run=job))

    fut, _ = state.once(("create_model", model_id), submit)
    return future_answer(fut)
