"""The agent-skill adapter's REST API: its training routes over the job manager (server/skill.py).

    POST /api/training/start              {"skill_path" | "skill_content", "adapter_type",
                                          "num_epochs", "learning_rate", "batch_size"} (each but
                                          the skill optional: SKILL_ADAPTER_* defaults)
                                          -> {job_id "train-…", status "queued", created_at}
    GET  /api/training/{job_id}/status    {job_id, status, progress 0-1, current_epoch,
                                          total_epochs, loss, started_at}
    GET  /api/training/{job_id}/logs      {job_id, logs: [the job's log lines]}
    POST /api/training/{job_id}/evaluate  held-out accuracy, BLEU, perplexity and the report

The jobs are those of the job API (/api/jobs; the same ids work there), with the same keys and
isolation: another key's job is not found. The key goes in `X-API-Key` or as `Authorization:
Bearer` (scripts written for that API send one or the other).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

from tuneforge.errors import UserError
from tuneforge.jobs import host
from tuneforge.server import skill
from tuneforge.server.deps import JsonBody, OptionalJsonBody, State
from tuneforge.server.routes.compat import key_owner

router = APIRouter(prefix="/api/training")
Owner = Annotated[str, Depends(key_owner)]


def install(app: FastAPI) -> None:
    """Read and check the SKILL_ADAPTER_* settings (a bad one stops the start), write each of
    this door's jobs' checkpoint folders as it ends, and serve the routes."""
    settings = skill.load_settings()
    state = app.state.tf
    app.state.skill_settings = settings
    state.jobs.on_end(lambda row, status: skill.write_layout(state, settings, row, status))
    app.include_router(router)


def _settings(request: Request) -> skill.SkillSettings:
    return request.app.state.skill_settings


@router.post("/start")
async def start_training(state: State, owner: Owner, request: Request, body: JsonBody) -> dict:
    spec = await asyncio.to_thread(skill.job_spec, state, _settings(request), body)
    row = await asyncio.to_thread(state.jobs.submit, owner, spec, skill.ID_PREFIX)
    return {"job_id": row.id, "status": row.status,
            "created_at": skill.iso(row.created_at)}


@router.get("/{job_id}/status")
def training_status(state: State, owner: Owner, job_id: str) -> dict:
    return skill.status_json(state.jobs.get(owner, job_id))


@router.get("/{job_id}/logs")
def training_logs(state: State, owner: Owner, job_id: str) -> dict:
    return {"job_id": job_id, "logs": skill.log_lines(state.jobs.get(owner, job_id))}


@router.post("/{job_id}/evaluate")
async def evaluate_training(state: State, owner: Owner, job_id: str, request: Request,
                            body: OptionalJsonBody = None) -> dict:
    """No options: the job's adapter on its held-out teacher answers."""
    if body:
        names = ", ".join(sorted(body))
        raise UserError(f"{names}: unknown field (evaluate takes no options)",
                        fields=[{"field": name, "message": "unknown field"} for name in body])
    row = state.jobs.get(owner, job_id)
    if row.status != "completed":
        message = f"the job is {row.status}; evaluate it once it completes"
        raise UserError(f"job_id: {message}", fields=[{"field": "job_id", "message": message}])
    _, _, token = request.headers.get("authorization", "").partition(" ")
    api_key = request.headers.get("x-api-key") or token.strip()
    evaluated = await asyncio.to_thread(host.evaluate, state.jobs.base_url, api_key,
                                        Path(row.folder))
    return skill.evaluation_json(row, evaluated)
