"""A tuneforge server inside the current process, on a free loopback port (for `tuneforge
train` without --url)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from tuneforge.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_server(settings: Settings, timeout: float = 300.0) -> Iterator[tuple[str, str]]:
    """Yields (base_url, api_key) of a running server; stops it on exit."""
    import uvicorn

    from tuneforge.server.app import create_app
    from tuneforge.server.state import ServerState

    settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    state = ServerState(settings)
    app = create_app(settings, state)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True, name="tuneforge-server")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the embedded server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{settings.host}:{settings.port}", state.default_key
    finally:
        server.should_exit = True
        thread.join(30)
