"""The web console: static files of a single-page app, served by this server.

`GET /` is the page; `/console/...` its scripts, stylesheet and the vendored chart library
(uPlot, MIT, its licence beside it). The page reads everything through the same public API as
any other client (runs, run metrics, jobs, system, the OpenAI-compatible chat), with the user's
API key in a header; it loads nothing from any other origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

# The page may load only from this server; inline scripts are not used.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'")


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP,
                                     "Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")
