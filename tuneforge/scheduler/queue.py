"""The scheduler: orders each model's requests by `seq_id` and feeds one engine worker thread.

Ordering and idempotency (the SDK relies on both): a training client numbers its requests
1, 2, 3, … per model and may send chunks of one call concurrently or re-send after a network
error. A request is held until its predecessor arrived, then queued; a repeated
`(model_id, seq_id)` gets the original future back. Requests that are not per-model ordered
(create_model, sampling) are queued as they come.

The worker executes one job at a time, in queue order. A job that raises fails only its own
future: a `TuneforgeError` with its own message and category, anything else as a server error
with the traceback logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.errors import TuneforgeError
from tuneforge.scheduler.futures import Future, FutureStore

logger = logging.getLogger(__name__)

Job = Callable[[], dict | bytes]

_DEDUPE_HISTORY = 4096


@dataclass
class _Sequencer:
    next_seq: int = 1
    waiting: dict[int, tuple[Future, Job]] = field(default_factory=dict)
    seen: OrderedDict[int, Future] = field(default_factory=OrderedDict)


class Scheduler:
    def __init__(self, futures: FutureStore, on_thread_start: Callable[[], None] | None = None):
        self.futures = futures
        self._queue: queue.Queue[tuple[Future, Job] | None] = queue.Queue()
        self._sequencers: dict[str, _Sequencer] = {}
        self._lock = threading.Lock()
        self._on_thread_start = on_thread_start
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tuneforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # ---- submission ---------------------------------------------------------------------------

    def submit(self, fut: Future, job: Job) -> Future:
        self._queue.put((fut, job))
        return fut

    def open_model(self, model_id: str, next_seq: int = 1) -> None:
        """Start ordering `model_id`'s requests; its first expected `seq_id` is `next_seq`."""
        with self._lock:
            self._sequencers.setdefault(model_id, _Sequencer(next_seq=next_seq))

    def close_model(self, model_id: str) -> None:
        with self._lock:
            self._sequencers.pop(model_id, None)

    def submit_ordered(self, model_id: str, seq_id: int, request_type: str, owner: str,
                       job: Job) -> Future:
        """Queue `job` as request `seq_id` of `model_id`, or return the future of a repeat."""
        ready: list[tuple[Future, Job]] = []
        with self._lock:
            seqr = self._sequencers.get(model_id)
            if seqr is not None and seq_id in seqr.seen:
                return seqr.seen[seq_id]
            fut = self.futures.create(request_type, owner, model_id)
            if seqr is None:
                self.futures.fail(fut, f"model_id {model_id!r} is not a training model on this "
                                       "server", "user")
                return fut
            if seq_id < seqr.next_seq:
                self.futures.fail(fut, f"seq_id {seq_id} of {model_id} was already executed "
                                       f"(next expected: {seqr.next_seq})", "user")
                return fut
            seqr.seen[seq_id] = fut
            while len(seqr.seen) > _DEDUPE_HISTORY:
                seqr.seen.popitem(last=False)
            seqr.waiting[seq_id] = (fut, job)
            while seqr.next_seq in seqr.waiting:
                ready.append(seqr.waiting.pop(seqr.next_seq))
                seqr.next_seq += 1
        for item in ready:
            self._queue.put(item)
        return fut

    # ---- worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, job = item
            self.run_now(fut, job)

    def run_now(self, fut: Future, job: Job) -> None:
        started = time.monotonic()
        try:
            result = job()
        except TuneforgeError as e:
            self.futures.fail(fut, e.message, e.category)
        except Exception as e:  # a bug or a resource failure: fail this request, keep serving
            logger.exception("request %s (%s) failed", fut.request_id, fut.request_type)
            self.futures.fail(fut, f"internal error: {type(e).__name__}: {e}", "server")
        else:
            self.futures.resolve(fut, result)
        finally:
            logger.debug("%s %s: queued %.3f s, ran %.3f s", fut.request_type, fut.request_id,
                         started - fut.created, time.monotonic() - started)
