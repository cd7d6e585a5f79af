"""Authentication: the `X-API-Key` header the SDK sends on every request.

Keys are stored hashed in the database (`storage/keys.py`) and looked up on every request, so a
key revoked with `tuneforge keys revoke` is refused at once.
"""

from __future__ import annotations

from fastapi import Request

from tuneforge.errors import AuthError


def require_key(request: Request) -> str:
    """FastAPI dependency: the owner id of the caller's key, or 401."""
    key = request.headers.get("x-api-key")
    if not key:
        raise AuthError("missing API key: send it in the X-API-Key header")
    identity = request.app.state.tf.keys.identify(key)
    if identity is None:
        raise AuthError("invalid or revoked API key")
    return identity.owner
