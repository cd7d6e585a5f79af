"""`/api/runs`: training runs with their recorded metrics, a live metrics stream, checkpoints.

The JSON surface the console (and any dashboard) reads; the Tinker-compatible views of the same
runs stay under `/api/v1/training_runs`. Every lookup is owner-scoped like the rest of the
server: another key's run answers 404.

The stream is Server-Sent Events: `retry: 2000`, then every row after the `Last-Event-ID`
header (or `?last_event_id=`), then new rows as they are recorded, with a `: keepalive` comment
after `KEEPALIVE_SECONDS` of silence. Waiting costs no thread: the stream awaits its
subscription's asyncio event, which the engine thread sets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from tuneforge.errors import NotFound, UserError
from tuneforge.export import formats
from tuneforge.server.deps import Owner, State
from tuneforge.server.routes import runs
from tuneforge.server.state import ServerState, tinker_path
from tuneforge.storage import checkpoints
from tuneforge.storage.db import TrainingRunRow

router = APIRouter(prefix="/api/runs")

KEEPALIVE_SECONDS = 15.0
HISTORY_PAGE = 1000
MAX_METRICS_LIMIT = 100_000
_merging = threading.Semaphore(1)  # a merged export holds a whole base model in memory
_STALE_EXPORT_SECONDS = 3600.0


def _iso(value: dt.datetime) -> str:
    # SQLite hands back naive datetimes; every time stored is UTC
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


def run_summary(state: ServerState, row: TrainingRunRow, last: dict | None) -> dict:
    metadata = row.user_metadata or {}
    return {
        "id": row.id,
        "base_model": row.base_model,
        "lora_rank": row.lora_rank,
        "owner": row.owner,
        "session_id": row.session_id,
        "created_at": _iso(row.created_at),
        "last_request_time": _iso(row.last_request_time),
        "loaded": row.id in state.model_owners,
        "steps": last["step"] if last else 0,
        "last_loss": last.get("loss") if last else None,
        "last_lr": last.get("lr") if last else None,
        "user_metadata": metadata,
        "job_id": metadata.get("job_id"),
    }


@router.get("")
def list_runs(state: State, owner: Owner, limit: int = 20, offset: int = 0) -> dict:
    rows, cursor = runs.page(state, TrainingRunRow, owner, limit, offset)
    latest = state.run_metrics.latest([r.id for r in rows])
    return {"runs": [run_summary(state, r, latest.get(r.id)) for r in rows], "cursor": cursor}


@router.get("/{run_id}")
def get_run(run_id: str, state: State, owner: Owner) -> dict:
    row = state.run(run_id, owner)
    return run_summary(state, row, state.run_metrics.latest([row.id]).get(row.id))


@router.get("/{run_id}/metrics")
def get_metrics(run_id: str, state: State, owner: Owner, after: int = 0,
                limit: int = 10_000) -> dict:
    state.run(run_id, owner)
    if not 1 <= limit <= MAX_METRICS_LIMIT:
        raise UserError(f"limit must be in [1, {MAX_METRICS_LIMIT}], got {limit}")
    return {"run_id": run_id, "metrics": state.run_metrics.rows(run_id, after, limit)}


def _event_id(header: str | None, query: int | None) -> int:
    if query is not None:
        return query
    if header is None or not header.strip():
        return 0
    try:
        return int(header.strip())
    except ValueError:
        raise UserError(f"Last-Event-ID must be an integer row id, got {header!r}") from None


def _event(row: dict) -> str:
    return f"id: {row['id']}\nevent: metric\ndata: {json.dumps(row, allow_nan=False)}\n\n"


@router.get("/{run_id}/metrics/stream")
async def stream_metrics(run_id: str, request: Request, state: State, owner: Owner,
                         last_event_id: int | None = None) -> StreamingResponse:
    await asyncio.to_thread(state.run, run_id, owner)
    after = _event_id(request.headers.get("last-event-id"), last_event_id)
    recorder = state.run_metrics

    async def events() -> AsyncIterator[str]:
        # Subscribed before the history is read: a row recorded meanwhile is in one or both,
        # and ids drop the repeats.
        sub = recorder.subscribe(run_id, asyncio.get_running_loop())
        try:
            yield "retry: 2000\n\n"
            last = after
            while True:
                page = await asyncio.to_thread(recorder.rows, run_id, last, HISTORY_PAGE)
                for row in page:
                    yield _event(row)
                    last = row["id"]
                if len(page) < HISTORY_PAGE:
                    break
            while True:
                rows = await sub.next_rows(KEEPALIVE_SECONDS)
                if rows is None:
                    return
                if not rows:
                    yield ": keepalive\n\n"
                for row in rows:
                    if row["id"] > last:
                        yield _event(row)
                        last = row["id"]
        finally:
            recorder.unsubscribe(sub)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{run_id}/checkpoints")
def list_checkpoints(run_id: str, state: State, owner: Owner) -> dict:
    return runs.list_run_checkpoints(run_id, state, owner)


@router.get("/{run_id}/checkpoints/{kind}/{name}/archive")
def checkpoint_archive(run_id: str, kind: str, name: str, state: State, owner: Owner,
                       merged: bool = False, format: str | None = None,  # noqa: A002
                       dtype: str | None = None) -> StreamingResponse:
    """The checkpoint as a streamed .tar.gz: its PEFT files, or (`format=`, see
    export/formats.py; `merged=true` is `format=merged`) another export format."""
    if merged and format not in (None, "merged"):
        raise UserError(f"merged=true contradicts format={format!r}")
    fmt = "merged" if merged else format or "peft"
    formats.check_args(fmt, dtype)
    state.run(run_id, owner)
    row = state.checkpoint(tinker_path(run_id, kind, name), owner)
    folder = state.paths.checkpoint(run_id, kind, row.name)
    if not (folder / checkpoints.ADAPTER_FILE).exists():
        raise NotFound(f"checkpoint {row.tinker_path} has no files on this server")
    stem = f"{run_id}-{kind}-{name}".replace(":", "_")
    if fmt == "peft" and dtype is None:
        files = [(folder / f, f"{stem}/{f}")
                 for f in (checkpoints.CONFIG_FILE, checkpoints.ADAPTER_FILE)]
        return _tar_response(files, f"{stem}.tar.gz")
    exports = state.paths.root / "exports"
    exports.mkdir(exist_ok=True)
    _remove_stale(exports)
    dest = exports / f"merge-{uuid.uuid4().hex[:12]}"
    dest.mkdir()
    try:
        with _merging:
            formats.write(fmt, folder, dest, state.registry, dtype)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    top = f"{stem}-{fmt}" if fmt != "merged" else f"{stem}-merged"
    files = [(p, f"{top}/{p.relative_to(dest)}")
             for p in sorted(dest.rglob("*")) if p.is_file()]
    return _tar_response(files, f"{top}.tar.gz",
                         BackgroundTask(shutil.rmtree, dest, ignore_errors=True))


@router.delete("/{run_id}/checkpoints/{kind}/{name}")
def delete(run_id: str, kind: str, name: str, state: State, owner: Owner) -> Response:
    return runs.delete(run_id, kind, name, state, owner)


def _remove_stale(exports: Path) -> None:
    """Merged exports left behind by a server that stopped while sending one."""
    for old in exports.glob("merge-*"):
        if time.time() - old.stat().st_mtime > _STALE_EXPORT_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def _tar_response(files: list[tuple[Path, str]], filename: str,
                  background: BackgroundTask | None = None) -> StreamingResponse:
    return StreamingResponse(tar_gz(files), media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'},
                             background=background)


def tar_gz(files: list[tuple[Path, str]], chunk: int = 1 << 20) -> Iterator[bytes]:
    """A gzip-compressed tar of `files` ((path, name in the archive)), produced piece by piece:
    memory stays at one chunk whatever the files' size."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    for path, arcname in files:
        st = path.stat()
        info = tarfile.TarInfo(arcname)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
        out = gz.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        with open(path, "rb") as f:
            while data := f.read(chunk):
                out += gz.compress(data)
                if out:
                    yield out
                    out = b""
        out += gz.compress(b"\0" * (-st.st_size % tarfile.BLOCKSIZE))
        if out:
            yield out
    yield gz.compress(b"\0" * (2 * tarfile.BLOCKSIZE)) + gz.flush()
