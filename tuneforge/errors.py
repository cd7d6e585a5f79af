"""One exception hierarchy for the whole server.

Each class also inherits the builtin it stands for, so library code can catch `ValueError` or
`LookupError` as usual. `server/errors.py` maps these to HTTP statuses and Tinker error bodies in
one place; a failed future carries `category` ("user" or "server") to the SDK's
`RequestFailedError`.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base class. `status` is the HTTP status used when raised directly in a route."""

    status: int = 500
    category: str = "server"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(TuneforgeError, ValueError):
    """The request is wrong; the message names the field and what was expected. `fields`, when
    given, lists each problem as {"field": dotted option path, "message"} (the HTTP error body
    carries it as `errors`)."""

    status = 400
    category = "user"

    def __init__(self, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields


class LimitExceeded(UserError):
    """A request exceeds a configured limit; the message names the limit and its value."""


class Unsupported(UserError, NotImplementedError):
    """The request asks for something tuneforge does not implement; the message names it."""


class NotFound(TuneforgeError, LookupError):
    status = 404
    category = "user"


class Gone(TuneforgeError):
    """The resource existed but is finished or expired (e.g. a closed session)."""

    status = 410
    category = "user"


class AuthError(TuneforgeError, PermissionError):
    status = 401
    category = "user"


class Forbidden(TuneforgeError, PermissionError):
    status = 403
    category = "user"


class EngineError(TuneforgeError, RuntimeError):
    """Something failed inside the engine that the request could not have prevented."""

    status = 500
    category = "server"


class WorkerLost(EngineError):
    """The engine worker serving a request went away (killed, out of memory) and what it held
    in memory with it; other workers are unaffected."""
