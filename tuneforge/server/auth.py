"""Authentication: the `X-API-Key` header the SDK sends on every request.

Keys are stored hashed in the database (`storage/keys.py`) and looked up on every request, so a
key revoked with `tuneforge keys revoke` is refused at once. On first start an admin key is
generated into `data_dir/api_key` (mode 0600) and printed, so the embedded default works with no
configuration.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import Request

from tuneforge.errors import AuthError, UserError
from tuneforge.storage.keys import KeyStore, new_key

logger = logging.getLogger(__name__)


def ensure_default_key(path: Path) -> str:
    """The key stored at `path`, generated on first use."""
    if path.exists():
        return path.read_text().strip()
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def register_default_key(path: Path, keys: KeyStore) -> str | None:
    """Create (first start) and register the data directory's admin key; None if revoked."""
    key = ensure_default_key(path)
    try:
        keys.add(key, name="default (data_dir/api_key)", admin=True)
    except UserError:
        logger.warning("the key in %s was revoked; use another key", path)
        return None
    return key


def require_key(request: Request) -> str:
    """FastAPI dependency: the owner id of the caller's key, or 401."""
    key = request.headers.get("x-api-key")
    if not key:
        raise AuthError("missing API key: send it in the X-API-Key header")
    identity = request.app.state.tf.keys.identify(key)
    if identity is None:
        raise AuthError("invalid or revoked API key")
    return identity.owner
