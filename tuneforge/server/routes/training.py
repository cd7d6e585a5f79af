"""Training: create_model, get_info, forward_backward, optim_step.

Handlers validate what the request envelope names (session, model, owner), then submit a job to
the scheduler and answer with a future at once. Everything about the content (token ids,
shapes, limits, hyperparameters) is checked inside the job, in `seq_id` order, so a bad request
fails only its own future and the training client stays usable.
"""

from __future__ import annotations

import math

import anyio.to_thread
from fastapi import APIRouter, Request
from tinker import types

from tuneforge.engine import optim
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.worker import EngineWorker, ModelInfo
from tuneforge.errors import TuneforgeError, Unsupported, UserError
from tuneforge.scheduler.queue import Work
from tuneforge.server import wire
from tuneforge.server.deps import JsonBody, Owner, State, future_answer
from tuneforge.server.state import ServerState
from tuneforge.storage.db import TrainingRunRow

router = APIRouter(prefix="/api/v1")


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def register_run(state: ServerState, engine: EngineWorker, info: ModelInfo, session_id: str,
                 owner: str, user_metadata: dict | None) -> None:
    """Record a model the engine just created; if that fails, the engine forgets it again."""
    lora = info.lora
    try:
        state.db.add(TrainingRunRow(
            id=info.model_id, session_id=session_id, owner=owner, base_model=info.base_model,
            lora_rank=lora.rank, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
            train_unembed=lora.train_unembed, seed=lora.seed,
            user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()}))
    except BaseException:
        engine.forget_model(info.model_id)
        raise
    state.model_owners[info.model_id] = owner
    state.model_lanes[info.model_id] = info.base_model
    state.model_info[info.model_id] = info


def gradient_checkpointing(user_metadata: dict) -> bool:
    """A run asks for gradient checkpointing with user_metadata gradient_checkpointing=true
    (the SDK has no field for it)."""
    value = user_metadata.get("gradient_checkpointing", "false")
    text = str(value).lower() if isinstance(value, str | bool) else None
    if text not in ("true", "false"):
        raise UserError(f"user_metadata.gradient_checkpointing must be 'true' or 'false', got "
                        f"{value!r}")
    return text == "true"


# user_metadata keys of a run's LoRA options: (the engine's name for it, what the value must
# be, the test it must pass)
_LORA_OPTIONS = {
    "lora_alpha": ("alpha", "a number > 0", lambda v: v > 0),
    "lora_dropout": ("dropout", "a number in the range [0, 1)", lambda v: 0 <= v < 1),
}


def lora_options(user_metadata: dict) -> dict[str, float]:
    """A run's LoRA alpha and dropout, asked for with user_metadata lora_alpha / lora_dropout
    (the SDK has no field for them), as PEFT's `LoraConfig.lora_alpha` / `lora_dropout`: only
    the keys given, each checked, under the engine's names (`alpha`, `dropout`)."""
    out = {}
    for key, (name, what, ok) in _LORA_OPTIONS.items():
        if key not in user_metadata:
            continue
        value = user_metadata[key]
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and ok(number)):
            raise UserError(f"user_metadata.{key} must be {what}, got {value!r}")
        out[name] = number
    return out


def check_optimizer_config(config: types.OptimizerConfig | None) -> None:
    if config is not None and config.type != "adamw":
        raise Unsupported(f"optimizer_config.type {config.type!r} is not supported (only 'adamw')")


@router.post("/create_model")
def create_model(state: State, owner: Owner, body: JsonBody) -> dict:
    req = wire.parse(types.CreateModelRequest, body, "create_model")
    state.session(req.session_id, owner)
    metadata = wire.check_metadata(req.user_metadata, "user_metadata")
    checkpoint = gradient_checkpointing(metadata)
    options = lora_options(metadata)
    model_id = model_id_for(req.session_id, req.model_seq_id)

    def submit():
        fut = state.futures.create("CreateModel", owner, model_id)
        state.scheduler.open_model(model_id, req.base_model)

        def job(engine: EngineWorker) -> dict:
            check_optimizer_config(req.optimizer_config)
            state.check_model_quota(owner)
            lc = req.lora_config or types.LoraConfig(rank=32)
            seed = lc.seed if lc.seed is not None else state.seeds.lora()
            config = LoRAConfig(rank=lc.rank,
                                alpha=options.get("alpha", state.settings.lora_alpha),
                                dropout=options.get("dropout", 0.0),
                                train_attn=lc.train_attn, train_mlp=lc.train_mlp,
                                train_unembed=lc.train_unembed, seed=seed)
            info = engine.create_model(model_id, req.base_model, config, checkpoint)
            register_run(state, engine, info, req.session_id, owner, req.user_metadata)
            return {"model_id": model_id, "type": "create_model"}

        return state.scheduler.submit(fut, Work(lane=req.base_model, model_id=model_id,
                                                run=job))

    fut, _ = state.once(("create_model", model_id), submit)
    return future_answer(fut)


@router.post("/get_info")
def get_info(state: State, owner: Owner, body: JsonBody) -> dict:
    req = wire.parse(types.GetInfoRequest, body, "get_info")
    state.check_model_owner(req.model_id, owner)
    info = state.model_info[req.model_id]  # as recorded at creation: no engine call
    return {
        "type": "get_info",
        "model_id": req.model_id,
        "model_data": {"arch": info.arch, "model_name": info.base_model,
                       "tokenizer_id": info.tokenizer_dir},
        "is_lora": True,
        "lora_rank": info.lora.rank,
        "model_name": info.base_model,
        "optimizer_config": {"type": "adamw"},
    }


@router.post("/forward_backward")
async def forward_backward(request: Request, state: State, owner: Owner) -> dict:
    body = await request.body()
    if len(body) > wire.MAX_BODY_BYTES:
        raise UserError(f"forward_backward: body of {len(body)} bytes exceeds the limit "
                        f"of {wire.MAX_BODY_BYTES}")
    encoding = request.headers.get("content-encoding")
    # Decoding is CPU work: keep it off the event loop.
    return await anyio.to_thread.run_sync(_submit_forward_backward, state, owner, body, encoding)


def _submit_forward_backward(state: ServerState, owner: str, body: bytes,
                             encoding: str | None) -> dict:
    msg = wire.parse_forward_backward(body, encoding)  # an unreadable envelope is a 400
    request_type = "Forward" if msg.forward_only else "ForwardBackward"
    try:
        fb = wire.forward_backward_input(msg)
        encode = wire.encode_forward_backward
        if not fb.forward_only:  # the step's loss and tokens, for the run's metrics
            encode = state.run_metrics.recording_encoder(msg.model_id, fb, encode)
        work = Work(fb=fb, encode_fb=encode)
    except TuneforgeError as e:  # bad content fails this future, in order
        def fail(_engine: EngineWorker, error: TuneforgeError = e) -> bytes:
            raise error

        work = Work(run=fail)
    fut = state.submit_for_model(owner, msg.model_id, msg.seq_id, request_type, work)
    return future_answer(fut)


@router.post("/optim_step")
def optim_step(state: State, owner: Owner, body: JsonBody) -> dict:
    model_id, seq_id = wire.ordered_envelope(body, "optim_step")

    def job(engine: EngineWorker) -> dict:
        req = wire.parse(types.OptimStepRequest, body, "optim_step")
        params = req.optim_params
        if not isinstance(params, types.AdamParams):
            raise Unsupported(f"optim_step: optimizer {getattr(params, 'type', '?')!r} is not "
                              "supported (only Adam)")
        hp = optim.AdamParams(
            learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
            eps=params.eps, weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm)
        metrics = engine.optim_step(model_id, hp)
        state.run_metrics.optim_step(model_id, hp, metrics)
        state.note_activity(model_id)
        return {"metrics": metrics, "type": "optim_step"}

    fut = state.submit_for_model(owner, model_id, seq_id, "OptimStep", job)
    return future_answer(fut)

