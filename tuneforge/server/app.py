"""The FastAPI application: routers, error mapping, and the server's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.errors import TuneforgeError
from tuneforge.server.routes import (
    anthropic,
    client,
    console,
    files,
    futures,
    jobs,
    metrics,
    oai,
    run_metrics,
    runs,
    sampling,
    sessions,
    skill,
    system,
    training,
    weights,
)
from tuneforge.server.routes.weights import delete_checkpoint
from tuneforge.server.state import ServerState, parse_tinker_path
from tuneforge.settings import Settings
from tuneforge.storage.db import CheckpointRow, SessionRow, utcnow

logger = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 60.0


def create_app(settings: Settings, state: ServerState | None = None) -> FastAPI:
    state = state or ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        task = asyncio.create_task(_maintenance(state))
        load_task = asyncio.create_task(state.load.run())
        try:
            yield
        finally:
            task.cancel()
            load_task.cancel()
            state.stop()

    # /docs and /redoc would load their assets from a CDN; /openapi.json stays served
    app = FastAPI(title="tuneforge", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.tf = state
    for module in (client, sessions, training, weights, sampling, futures, runs, files, metrics,
                   jobs, run_metrics, system, oai, anthropic):
        app.include_router(module.router)
    skill.install(app)
    console.install(app)
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    # Every error answer is JSON with a non-empty body (the SDK retries an empty-body 400 as a
    # network glitch).
    @app.exception_handler(TuneforgeError)
    async def tuneforge_error(_request: Request, exc: TuneforgeError) -> JSONResponse:
        body = {"detail": exc.message, "category": exc.category}
        if getattr(exc, "fields", None):  # a UserError naming the options at fault
            body["errors"] = exc.fields
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
            for e in exc.errors()[:5])
        return JSONResponse({"detail": problems or "invalid request", "category": "user"},
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "category": "user"},
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}",
                             "category": "server"}, status_code=500)


async def _maintenance(state: ServerState) -> None:
    """Forget old future results, delete checkpoints whose TTL has passed, end sessions whose
    client stopped sending heartbeats."""
    timeout = state.settings.session_timeout_seconds
    period = min(MAINTENANCE_SECONDS, timeout / 2) if timeout else MAINTENANCE_SECONDS
    while True:
        await asyncio.sleep(period)
        try:
            state.futures.sweep()
            await asyncio.to_thread(_expire_checkpoints, state)
            if timeout:
                await asyncio.to_thread(_expire_sessions, state, timeout)
        except Exception:
            logger.exception("maintenance failed")


def _expire_sessions(state: ServerState, timeout: float) -> None:
    cutoff = utcnow() - dt.timedelta(seconds=timeout)
    stale = state.db.select(select(SessionRow).where(SessionRow.finished_at.is_(None),
                                                     SessionRow.last_heartbeat < cutoff))
    for row in stale:
        logger.warning("session %s sent no heartbeat for %.0f s: finished, its models freed",
                       row.id, timeout)
        state.finish_session(row.id, row.owner, "expired")


def _expire_checkpoints(state: ServerState) -> None:
    expired = state.db.select(select(CheckpointRow).where(CheckpointRow.expires_at < utcnow()))
    for row in expired:
        logger.info("checkpoint %s expired", row.tinker_path)
        delete_checkpoint(state, row.tinker_path,
                          state.paths.checkpoint(*parse_tinker_path(row.tinker_path)))
