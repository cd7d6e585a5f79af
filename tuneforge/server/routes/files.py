"""Download URLs for exported weights (what `tinker checkpoint download` fetches).

`external_weights_urls` answers one signed URL per file of an `external_weights` checkpoint. The
SDK then fetches them with plain GETs and no API key, so each URL carries its own proof: an
HMAC over the file's path and an expiry time, keyed by a secret kept in the data directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from tuneforge.errors import Forbidden, NotFound
from tuneforge.server.deps import Owner, State
from tuneforge.server.state import tinker_path

router = APIRouter()

URL_LIFETIME_SECONDS = 3600
_KIND = "external_weights"


def url_secret(path: Path) -> bytes:
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # another process created it first
    return path.read_text().strip().encode()


def _signature(secret: bytes, resource: str, expires: int) -> str:
    return hmac.new(secret, f"{resource}|{expires}".encode(), hashlib.sha256).hexdigest()


@router.get("/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}"
            "/external_weights_urls")
def external_weights_urls(run_id: str, name: str, request: Request, state: State,
                          owner: Owner) -> dict:
    row = state.checkpoint(tinker_path(run_id, _KIND, name), owner)
    folder = state.paths.checkpoint(row.training_run_id, _KIND, row.name)
    if not folder.exists():
        raise NotFound(f"checkpoint {row.tinker_path} has no files on this server")
    expires = int(time.time()) + URL_LIFETIME_SECONDS
    secret = url_secret(state.paths.url_secret_file)
    base = str(request.base_url).rstrip("/")
    urls = {}
    for f in sorted(p.name for p in folder.iterdir() if p.is_file()):
        resource = f"{run_id}/{name}/{f}"
        urls[f] = (f"{base}/files/{resource}?expires={expires}"
                   f"&signature={_signature(secret, resource, expires)}")
    return {"urls": urls, "expires": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat()}


@router.get("/files/{run_id}/{name}/{filename}")
def download(run_id: str, name: str, filename: str, state: State, expires: int = 0,
             signature: str = "") -> FileResponse:
    resource = f"{run_id}/{name}/{filename}"
    expected = _signature(url_secret(state.paths.url_secret_file), resource, expires)
    if not hmac.compare_digest(expected, signature) or expires < time.time():
        raise Forbidden("this download URL is invalid or has expired; ask for new URLs")
    folder = state.paths.checkpoint(run_id, _KIND, name)
    target = folder / filename
    if "/" in filename or not target.is_file() or target.parent != folder:
        raise NotFound(f"no file {filename!r} in checkpoint {run_id}/{_KIND}/{name}")
    return FileResponse(target, filename=filename)
