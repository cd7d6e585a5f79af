"""Futures: request id → pending | done(result) | failed(error), with long-poll waiting.

Results are completed from the engine's worker thread and awaited from the HTTP event loop, so
the store is guarded by a plain lock and wakes asyncio waiters with `call_soon_threadsafe`.
A finished future is kept for `ttl` seconds after completion (a poll whose answer was lost is
repeated with the same id), then swept.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

State = Literal["pending", "done", "failed"]
_ID_RE = re.compile(r"^req-([0-9a-f]{8})-[0-9]+$")


@dataclass
class Future:
    request_id: str
    request_type: str
    owner: str
    model_id: str | None = None
    state: State = "pending"
    result: dict | bytes | None = None  # JSON object, or protobuf bytes
    error: str | None = None
    category: str = "server"
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    extra: dict = field(default_factory=dict)  # e.g. sample_sequence_ids for the submit answer
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(
        default_factory=list, repr=False)


class FutureStore:
    def __init__(self, ttl_seconds: float = 3600.0) -> None:
        self.ttl = ttl_seconds
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def create(self, request_type: str, owner: str, model_id: str | None = None) -> Future:
        with self._lock:
            fid = f"req-{self._prefix}-{next(self._counter)}"
            fut = Future(request_id=fid, request_type=request_type, owner=owner, model_id=model_id)
            self._futures[fid] = fut
            return fut

    def is_from_earlier_process(self, request_id: str) -> bool:
        """Whether `request_id` has our format but was issued before this process started."""
        m = _ID_RE.match(request_id)
        return m is not None and m.group(1) != self._prefix

    def get(self, request_id: str) -> Future | None:
        with self._lock:
            return self._futures.get(request_id)

    def resolve(self, fut: Future, result: dict | bytes) -> None:
        self._finish(fut, "done", result=result)

    def fail(self, fut: Future, message: str, category: str = "server") -> None:
        self._finish(fut, "failed", error=message, category=category)

    def _finish(self, fut: Future, state: State, **values) -> None:
        with self._lock:
            if fut.state != "pending":
                return
            for k, v in values.items():
                setattr(fut, k, v)
            fut.state = state
            fut.finished = time.monotonic()
            waiters, fut._waiters = fut._waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)

    async def wait(self, fut: Future, timeout: float) -> Future:
        """Return when `fut` is finished or `timeout` seconds passed (it may still be pending)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if fut.state != "pending":
                return fut
            waiter = loop.create_future()
            fut._waiters.append((loop, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            with self._lock:
                fut._waiters = [(lp, w) for lp, w in fut._waiters if w is not waiter]
        return fut

    def sweep(self) -> int:
        """Drop finished futures older than the TTL; returns how many were dropped."""
        now = time.monotonic()
        with self._lock:
            old = [k for k, f in self._futures.items()
                   if f.finished is not None and now - f.finished > self.ttl]
            for k in old:
                del self._futures[k]
        return len(old)

    def pending_count(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if f.state == "pending")


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
