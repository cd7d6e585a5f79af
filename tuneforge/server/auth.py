"""API keys: the `X-API-Key` header the SDK sends on every request.

Keys look like `tml-<random>` (the SDK refuses anything else before sending). Only SHA-256 hashes
are kept in memory and compared in constant time. The owner of a request, used to scope sessions,
runs and checkpoints, is a short id derived from the key's hash.

On first start a key is generated into `data_dir/api_key` (mode 0600) and printed, so the
embedded default works with no configuration; more keys can be given in `TUNEFORGE_API_KEYS`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fastapi import Request

from tuneforge.errors import AuthError

KEY_PREFIX = "tml-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_id(key_hash: str) -> str:
    return f"key-{key_hash[:12]}"


def ensure_default_key(path: Path) -> str:
    """The key stored at `path`, generated on first use."""
    if path.exists():
        return path.read_text().strip()
    key = KEY_PREFIX + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


class KeyStore:
    def __init__(self, keys: list[str]) -> None:
        for k in keys:
            if not k.startswith(KEY_PREFIX):
                raise ValueError(f"API keys must start with {KEY_PREFIX!r} (the SDK requires it)")
        self._hashes = [hash_key(k) for k in keys]

    def owner(self, key: str | None) -> str:
        """The owner id of `key`, or AuthError."""
        if not key:
            raise AuthError("missing API key: send it in the X-API-Key header")
        digest = hash_key(key)
        match = None
        for known in self._hashes:  # compare against every key: no early exit to time
            if hmac.compare_digest(digest, known):
                match = known
        if match is None:
            raise AuthError("invalid API key")
        return owner_id(match)


def require_key(request: Request) -> str:
    """FastAPI dependency: the caller's owner id."""
    return request.app.state.tf.keys.owner(request.headers.get("x-api-key"))
