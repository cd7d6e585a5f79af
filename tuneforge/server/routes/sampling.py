"""Sampling: create_sampling_session, samplers/{id}, asample."""

from __future__ import annotations

import math

from fastapi import APIRouter
from tinker import types

from tuneforge.engine.sampler import SampleRequest, SamplingParams
from tuneforge.engine.worker import EngineWorker
from tuneforge.errors import Gone, LimitExceeded, Unsupported, UserError
from tuneforge.scheduler.queue import Work
from tuneforge.server import wire
from tuneforge.server.deps import JsonBody, Owner, State, future_answer
from tuneforge.server.state import ServerState, parse_tinker_path
from tuneforge.storage.db import SamplerRow, TrainingRunRow

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session")
def create_sampling_session(state: State, owner: Owner, body: JsonBody) -> dict:
    req = wire.parse(types.CreateSamplingSessionRequest, body, "create_sampling_session")
    state.session(req.session_id, owner)
    sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
    existing = state.db.get(SamplerRow, sampler_id)
    if existing is not None:  # a retried request
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
    if req.model_path is not None:
        ckpt = state.checkpoint(req.model_path, owner)
        run = state.db.get(TrainingRunRow, ckpt.training_run_id)
        row = SamplerRow(id=sampler_id, session_id=req.session_id, owner=owner,
                         base_model=run.base_model, source="checkpoint",
                         model_path=req.model_path)
    elif req.base_model is not None:
        base = state.registry.card(req.base_model)  # loads it now: a bad name fails here
        row = SamplerRow(id=sampler_id, session_id=req.session_id, owner=owner,
                         base_model=base.name, source="base")
    else:
        raise UserError("create_sampling_session: model_path or base_model is required")
    state.db.add(row)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, state: State, owner: Owner) -> dict:
    row = state.sampler(sampler_id, owner)
    return {"sampler_id": row.id, "base_model": row.base_model, "model_path": row.model_path}


@router.post("/asample")
def asample(state: State, owner: Owner, body: JsonBody) -> dict:
    req = wire.parse(types.SampleRequest, body, "asample")
    if req.sampling_session_id is None:
        raise Unsupported("asample: sampling without a sampling_session_id is not supported; "
                          "create a sampling client first")
    row = state.sampler(req.sampling_session_id, owner)

    def submit():
        nonlocal req
        if req.sampling_params.seed is None and state.seeds.seed is not None:
            seed = state.seeds.sample(req.prompt.model_dump_json())
            req = req.model_copy(update={"sampling_params": req.sampling_params.model_copy(
                update={"seed": seed})})
        fut = state.futures.create("Sample", owner)
        fut.extra["sample_sequence_ids"] = [
            f"{fut.request_id}:{i}" for i in range(max(req.num_samples, 0))]
        layout: list[wire.SparseLayout | None] = [None]

        def prepare(engine: EngineWorker) -> tuple[str, SampleRequest]:  # engine thread
            sample_request, layout[0] = build_sample_request(state, row, req)
            ensure_sampler(state, engine, row)
            return row.id, sample_request

        work = Work(lane=row.base_model, sampler_id=row.id, sample=prepare,
                    encode_sample=lambda result: wire.encode_sample(result, layout[0]))
        return state.scheduler.submit(fut, work)

    key = ("asample", row.id, req.seq_id) if req.seq_id is not None else None
    fut = state.once(key, submit)[0] if key else submit()
    return future_answer(fut)


def ensure_sampler(state: ServerState, engine: EngineWorker, row: SamplerRow) -> None:
    """Load the sampler's weights into the engine if they are not there yet."""
    if engine.has_sampler(row.id):
        return
    if row.source == "checkpoint":
        folder = state.paths.checkpoint(*parse_tinker_path(row.model_path))
        if not folder.exists():
            raise Gone(f"the checkpoint {row.model_path} behind sampler {row.id} was deleted")
        engine.add_sampler_from_checkpoint(row.id, folder)
    elif row.source == "base":
        engine.add_sampler_for_base(row.id, row.base_model)
    elif (spilled := engine.spilled_sampler(row.id)) is not None:
        engine.add_sampler_from_checkpoint(row.id, spilled)
    else:
        raise Gone(f"sampler {row.id} held in-memory weights that were lost when the server "
                   "restarted or its engine worker went away; save weights for a sampler again")


def build_sample_request(state: ServerState, row: SamplerRow, req: types.SampleRequest
                         ) -> tuple[SampleRequest, wire.SparseLayout | None]:
    """The engine's request, and the sparse layout to answer `target_prompt_logprobs` in."""
    lim = state.settings.limits
    if not 1 <= req.num_samples <= lim.max_samples_per_request:
        raise LimitExceeded(f"num_samples must be between 1 and max_samples_per_request="
                            f"{lim.max_samples_per_request}, got {req.num_samples}")
    for name, k in (("topk_prompt_logprobs", req.topk_prompt_logprobs),
                    ("topk_sample_logprobs", req.topk_sample_logprobs),
                    ("prompt_alt_tokens_k", req.prompt_alt_tokens_k)):
        if not 0 <= k <= lim.max_topk_logprobs:
            raise LimitExceeded(f"{name} must be between 0 and max_topk_logprobs="
                                f"{lim.max_topk_logprobs}, got {k}")
    if req.record_stability_info:
        raise Unsupported("record_stability_info (stable_reinforce) is not supported")
    prompt: list[int] = []
    for chunk in req.prompt.chunks:
        if not isinstance(chunk, types.EncodedTextChunk):
            raise Unsupported(f"prompt: {getattr(chunk, 'type', type(chunk).__name__)} chunks "
                              "are not supported (this server samples text models only)")
        prompt.extend(chunk.tokens)
    p = req.sampling_params
    base = state.registry.card(row.base_model)
    target_ids, layout = None, None
    if req.target_prompt_logprobs is not None or req.prompt_alt_tokens_k:
        if len(prompt) < 2:
            raise UserError("target_prompt_logprobs and prompt_alt_tokens_k need a prompt of at "
                            "least 2 tokens")
    if req.target_prompt_logprobs is not None:
        target_ids, layout = wire.decode_target_ids(req.target_prompt_logprobs, len(prompt) - 1,
                                                    base.vocab_size, lim.max_tokens_per_request)
    max_tokens = p.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(lim.max_sample_tokens, base.max_context - len(prompt)))
    if not 1 <= max_tokens <= lim.max_sample_tokens:
        raise LimitExceeded(f"sampling_params.max_tokens must be between 1 and "
                            f"max_sample_tokens={lim.max_sample_tokens}, got {max_tokens}")
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise UserError(f"sampling_params.temperature must be >= 0, got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise UserError(f"sampling_params.top_p must be in (0, 1], got {p.top_p}")
    if p.top_k == 0 or p.top_k < -1:
        raise UserError(f"sampling_params.top_k must be -1 (off) or >= 1, got {p.top_k}")
    stop_ids: frozenset[int] = base.eos_token_ids
    stop_strings: tuple[str, ...] = ()
    if p.stop is not None:
        stops = [p.stop] if isinstance(p.stop, str) else list(p.stop)
        stop_ids = frozenset(s for s in stops if isinstance(s, int))
        stop_strings = tuple(s for s in stops if isinstance(s, str))
        if any(s == "" for s in stop_strings):
            raise UserError("sampling_params.stop: stop strings must not be empty")
        bad = [t for t in stop_ids if not 0 <= t < base.vocab_size]
        if bad:
            raise UserError(f"sampling_params.stop: token id {bad[0]} is outside the vocabulary "
                            f"[0, {base.vocab_size})")
    return SampleRequest(
        prompt=prompt,
        target_prompt_ids=target_ids,
        prompt_alt_tokens_k=req.prompt_alt_tokens_k,
        num_samples=req.num_samples,
        params=SamplingParams(max_tokens=max_tokens, temperature=p.temperature, top_k=p.top_k,
                              top_p=p.top_p, seed=p.seed, stop_token_ids=stop_ids,
                              stop_strings=stop_strings),
        prompt_logprobs=bool(req.prompt_logprobs),
        topk_prompt_logprobs=req.topk_prompt_logprobs,
        topk_sample_logprobs=req.topk_sample_logprobs,
        prompt_logprobs_last_n=req.prompt_logprobs_last_n,
    ), layout
