"""What the vendor-compatible APIs (routes/oai.py, routes/anthropic.py) share: a route class that
answers every error in the vendor's own body shape (so the Tinker routes keep theirs), and the
caller's key from `Authorization: Bearer` or `X-API-Key` (vendor clients send one or the other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.errors import AuthError

logger = logging.getLogger(__name__)

ErrorBody = Callable[[int, str], dict]  # (status, message) → the vendor's error body


def error_of(exc: Exception, body: ErrorBody, what: str) -> tuple[int, dict]:
    """Status and body of the errors every vendor maps alike: request validation, HTTP errors
    and unexpected failures (logged). Each vendor maps `TuneforgeError`s itself, first."""
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return 400, body(400, problems or "invalid request body")
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, body(exc.status_code, str(exc.detail))
    logger.error("%s request failed", what, exc_info=exc)
    return 500, body(500, f"internal error: {type(exc).__name__}")


def route_class(error_of: Callable[[Exception], tuple[int, dict]]) -> type[APIRoute]:
    """An APIRoute whose handler answers every exception as `error_of` maps it."""

    class VendorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # every error gets the vendor's shape
                    status, body = error_of(exc)
                    return JSONResponse(body, status_code=status)

            return guarded

    return VendorRoute


def key_owner(request: Request) -> str:
    """The owner id of the caller's key, from `X-API-Key` or `Authorization: Bearer`."""
    key = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not key and scheme.lower() == "bearer":
        key = token.strip()
    if not key:
        raise AuthError("missing API key: send it as `Authorization: Bearer <key>` or in the "
                        "X-API-Key header")
    identity = request.app.state.tf.keys.identify(key)
    if identity is None:
        raise AuthError("invalid or revoked API key")
    return identity.owner
