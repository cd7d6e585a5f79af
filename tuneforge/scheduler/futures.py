"""Futures: request id → pending | done(result) | failed(error), with long-poll waiting.

Results are completed from the engine's worker thread and awaited from the HTTP event loop, so
the store is guarded by a plain lock and wakes asyncio waiters with `call_soon_threadsafe`.
A finished future is kept for `ttl` seconds after completion (a poll whose answer was lost is
repeated with the same id), then swept.

A streaming sampling request's future also carries a `TokenStream`: the decoder pushes each
step's new tokens into it (engine thread, never blocking), one reader takes them (a thread or an
event loop), and the stream ends when the future finishes, after its last tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tuneforge.engine.sampler import TokenDelta

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
    stream: TokenStream | None = None  # a streaming sampling request's tokens, as decoded
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
        if fut.stream is not None:
            fut.stream.close()

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


class TokenStream:
    """The tokens of one streaming sampling request, as the decoder picks them.

    Writers: the engine thread (`push`, `close` via the future store); neither blocks, so a slow
    reader never slows the engine (the backlog is bounded by the request's max_tokens). One
    reader, on a thread (`get`, `batches`) or an event loop (`aget`, `abatches`); `cancel` may be
    called from anywhere: the decoder then drops the request's rows at its next step (a request
    still waiting for admission is failed without being decoded), and the stream ends.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[TokenDelta] = []
        self._closed = False
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.steps = 0  # pushes so far (decoding steps that reached this stream)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def closed(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        self._cancelled = True

    def push(self, deltas: list[TokenDelta]) -> None:
        with self._cond:
            self._items.extend(deltas)
            self.steps += 1
            self._notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._notify()

    def _notify(self) -> None:  # caller holds the lock
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)

    def _take(self) -> list[TokenDelta] | None:  # caller holds the lock
        if self._items:
            items, self._items = self._items, []
            return items
        return None if self._closed else []

    def get(self, timeout: float | None = None) -> list[TokenDelta] | None:
        """The tokens that arrived since the last call, waiting up to `timeout` seconds for some
        ([] if none came); None once the stream has ended and everything was taken."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._take()

    async def aget(self, timeout: float | None = None) -> list[TokenDelta] | None:
        """`get` for an event loop (does not block it)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._items or self._closed:
                return self._take()
            waiter = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            with self._cond:
                self._waiters = [(lp, w) for lp, w in self._waiters if w is not waiter]
        with self._cond:
            return self._take()

    def batches(self, keepalive: float) -> Iterator[list[TokenDelta]]:
        """Each batch of new tokens until the stream ends; [] after `keepalive` idle seconds."""
        while (items := self.get(keepalive)) is not None:
            yield items

    async def abatches(self, keepalive: float) -> AsyncIterator[list[TokenDelta]]:
        while (items := await self.aget(keepalive)) is not None:
            yield items


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
