"""The REST job API: declarative training jobs (see tuneforge.jobs and server/jobs.py).

    POST /api/jobs                 start a job (body: the job config as JSON) -> {id, status}
    GET  /api/jobs/schema          every job type's options (help, defaults, enums, bounds)
    POST /api/jobs/preview         {"config", "limit"}: the rows as the job would train on them
    GET  /api/jobs                 the caller's jobs, newest first
    GET  /api/jobs/{id}            status, progress 0-1, epoch/step, latest loss, ETA, result
    GET  /api/jobs/{id}/preview    ?limit=: the same for a submitted job
    GET  /api/jobs/{id}/logs       the log (text); ?follow=true streams it until the job ends
    GET  /api/jobs/{id}/metrics    per-step metrics, per-epoch history, checkpoints, its runs
    GET  /api/jobs/{id}/tasks      an atomic batch's tasks: status, epochs, best held-out loss
    GET  /api/jobs/{id}/tasks/{name}/metrics   one task of an atomic batch: the same
    POST /api/jobs/{id}/cancel     stop a queued or running job
    POST /api/jobs/{id}/evaluate   evaluate its adapter; optionally against a baseline

The fixed paths (/schema, /preview) are declared before /{job_id}, which would match them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tuneforge.errors import UserError
from tuneforge.jobs import host
from tuneforge.server.deps import JsonBody, OptionalJsonBody, Owner, State
from tuneforge.server.jobs import ACTIVE
from tuneforge.server.routes.runs import page
from tuneforge.storage.db import JobRow

router = APIRouter(prefix="/api/jobs")

FOLLOW_POLL_SECONDS = 0.5
EVALUATE_OPTIONS = {"data", "baseline", "task", "samples"}
PREVIEW_OPTIONS = {"config", "limit"}


@router.post("")
@router.post("/", include_in_schema=False)
async def start_job(state: State, owner: Owner, body: JsonBody) -> dict:
    row = await asyncio.to_thread(state.jobs.submit, owner, body)
    return job_json(row)


@router.get("/schema")
def job_schema() -> dict:
    return host.schema()


@router.post("/preview")
def preview_config(state: State, owner: Owner, body: JsonBody) -> dict:
    """Body: {"config": the job config as for POST /api/jobs, "limit": rows (default 20)}."""
    unknown = set(body) - PREVIEW_OPTIONS
    if unknown:
        raise UserError(f"preview: unknown option(s) {', '.join(sorted(unknown))} (options: "
                        f"{', '.join(sorted(PREVIEW_OPTIONS))})")
    if "config" not in body:
        raise UserError("config: required (the job config, as POST /api/jobs takes it)",
                        fields=[{"field": "config", "message": "required"}])
    spec = state.jobs.parse(body["config"])
    return state.jobs.preview(spec, None, _limit(body.get("limit", 20)))


@router.get("")
@router.get("/", include_in_schema=False)
def list_jobs(state: State, owner: Owner, limit: int = 100, offset: int = 0) -> dict:
    rows, cursor = page(state, JobRow, owner, limit, offset)
    return {"jobs": [job_json(r) for r in rows], "cursor": cursor}


@router.get("/{job_id}")
def get_job(state: State, owner: Owner, job_id: str) -> dict:
    return job_json(state.jobs.get(owner, job_id))


@router.get("/{job_id}/preview")
def preview_job(state: State, owner: Owner, job_id: str, limit: int = 20) -> dict:
    row = state.jobs.get(owner, job_id)
    spec = host.parse(row.spec)  # as it was accepted (its files were checked then)
    return state.jobs.preview(spec, Path(row.folder), _limit(limit))


def _limit(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError("limit must be an integer", fields=[{"field": "limit",
                                                              "message": "not an integer"}])
    return value


@router.get("/{job_id}/logs")
def job_logs(state: State, owner: Owner, job_id: str, follow: bool = False,
             offset: int = 0) -> StreamingResponse:
    row = state.jobs.get(owner, job_id)
    path = Path(row.folder) / "log.txt"
    if offset < 0:
        raise UserError("offset must be >= 0")

    async def lines():
        position = offset
        while True:
            chunk = b""
            if path.exists():
                with path.open("rb") as f:
                    f.seek(position)
                    chunk = f.read()
            if chunk:
                position += len(chunk)
                yield chunk
            if not follow:
                return
            live = await asyncio.to_thread(state.db.get, JobRow, job_id)
            if live is None or live.status not in ACTIVE:
                if path.exists() and path.stat().st_size > position:
                    continue  # the last lines, written as the job ended
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


@router.get("/{job_id}/metrics")
def job_metrics(state: State, owner: Owner, job_id: str) -> dict:
    row = state.jobs.get(owner, job_id)
    return {**host.metrics(Path(row.folder)), "runs": state.jobs.runs(row)}


@router.get("/{job_id}/tasks")
def job_tasks(state: State, owner: Owner, job_id: str) -> dict:
    row = state.jobs.get(owner, job_id)
    if row.type != "atomic":
        raise UserError(f"job {job_id!r} is a {row.type} job; only atomic jobs have tasks")
    return {"tasks": host.tasks(Path(row.folder), row.spec)}


@router.get("/{job_id}/tasks/{name}/metrics")
def task_metrics(state: State, owner: Owner, job_id: str, name: str) -> dict:
    return host.task_metrics(Path(state.jobs.get(owner, job_id).folder), name)


@router.post("/{job_id}/cancel")
def cancel_job(state: State, owner: Owner, job_id: str) -> dict:
    return job_json(state.jobs.cancel(owner, job_id))


@router.post("/{job_id}/evaluate")
async def evaluate_job(state: State, owner: Owner, job_id: str, request: Request,
                       body: OptionalJsonBody = None) -> dict:
    """Body (all optional): data (JSONL path or rows of the job's shape; default its held-out
    split), baseline ("base" or another job id), task (atomic jobs), samples (how many)."""
    body = body or {}
    unknown = set(body) - EVALUATE_OPTIONS
    if unknown:
        raise UserError(f"evaluate: unknown option(s) {', '.join(sorted(unknown))} (options: "
                        f"{', '.join(sorted(EVALUATE_OPTIONS))})")
    row = state.jobs.get(owner, job_id)
    baseline = body.get("baseline")
    baseline_folder = None
    if baseline is not None and baseline != "base":
        baseline_folder = Path(state.jobs.get(owner, str(baseline)).folder)
    data_source = body.get("data")
    if isinstance(data_source, str):
        data_source = state.jobs.check_file("data", data_source)
    samples = body.get("samples")
    if samples is not None and (not isinstance(samples, int) or not 0 <= samples <= 100):
        raise UserError("samples must be an integer in [0, 100]")
    api_key = request.headers.get("x-api-key")

    def work() -> dict:
        return host.evaluate(state.jobs.base_url, api_key, Path(row.folder),
                             data_source=data_source, baseline=baseline,
                             baseline_folder=baseline_folder, task=body.get("task"),
                             samples=samples)

    return {"id": job_id, **await asyncio.to_thread(work)}


def job_json(row: JobRow) -> dict:
    """A job as the API shows it."""
    progress = row.progress or {}
    return {
        "id": row.id, "name": row.name, "type": row.type, "status": row.status,
        "progress": progress.get("progress", 0.0), "step": progress.get("step"),
        "total_steps": progress.get("total_steps"), "epoch": progress.get("epoch"),
        "latest_loss": progress.get("loss"), "eta_seconds": progress.get("eta_seconds"),
        **({"tasks": progress["tasks"], "tasks_done": progress.get("tasks_done")}
           if "tasks" in progress else {}),
        "base_model": row.spec.get("base_model"), "owner": row.owner,
        "created_at": row.created_at.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "restarts": row.restarts, "error": row.error, "result": row.result,
        "folder": row.folder,
    }
