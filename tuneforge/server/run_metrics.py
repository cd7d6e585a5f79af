"""Run metrics: one row per optimizer step of every training run, recorded by the server.

The server already sees everything a training curve needs: each `forward_backward` result (its
`loss:sum`, the very value the client receives), the request's target tokens and loss weights,
and each `optim_step`'s hyperparameters and optimizer metrics. `RunMetrics` turns them into one
row per step, so a run's history exists whatever the client logs.

Cost on the engine thread is a few dictionary operations per request: token and weight sums are
computed when a request is submitted (on the HTTP worker thread), the engine thread only adds
numbers and appends the finished row to an in-memory buffer. A background thread writes the
buffer to the `run_metrics` table at most every `FLUSH_SECONDS`, and once more at shutdown; a
row is in the buffer or in the table (or, for an instant, both), never in neither.

Row ids are global and increasing (the SSE event ids): assigned here, in memory, continuing
from the table's largest id at start, so rows not yet written already have their final id.
Live readers subscribe per run; a new row is handed to each subscriber's event loop with
`call_soon_threadsafe`, so an open stream costs no thread while it waits.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select

from tuneforge.engine.optim import AdamParams
from tuneforge.engine.types import ForwardBackwardInput, ForwardBackwardResult
from tuneforge.storage.db import Database, RunMetricRow

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
MAX_SUBSCRIBER_BACKLOG = 10_000
"""Rows a live reader may fall behind by before its stream is ended (it reconnects with
Last-Event-ID and replays the rest from the table)."""

_COLUMNS = ("id", "run_id", "step")


@dataclass
class _RunState:
    """What one run accumulated since its last optimizer step (engine thread only)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    weight_sum: float = 0.0
    first_submitted: float | None = None  # monotonic time of the step's first forward_backward
    last_end: float | None = None  # monotonic time the previous step ended


class Subscription:
    """New rows of one run, delivered into one asyncio event loop."""

    def __init__(self, run_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.run_id = run_id
        self.loop = loop
        self.rows: deque[dict] = deque()
        self.ended = False
        self._event = asyncio.Event()

    def push(self, row: dict) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self._put, row)

    def end(self) -> None:
        """From any thread: the reader's next `next_rows` answers None."""
        self.loop.call_soon_threadsafe(self._put, None)

    def _put(self, row: dict | None) -> None:
        if row is None or len(self.rows) >= MAX_SUBSCRIBER_BACKLOG:
            self.ended = True
        else:
            self.rows.append(row)
        self._event.set()

    async def next_rows(self, timeout: float) -> list[dict] | None:
        """The rows that arrived (waiting up to `timeout` s; [] if none), or None once the
        stream should end (the reader fell too far behind, or the server is stopping)."""
        if not self.rows and not self.ended:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return []
        self._event.clear()
        if self.ended:
            return None
        out = list(self.rows)
        self.rows.clear()
        return out


class RunMetrics:
    def __init__(self, db: Database, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.db = db
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._runs: dict[str, _RunState] = {}
        self._pending: list[dict] = []  # rows not yet in the table, in id order
        self._last: dict[str, dict] = {}  # the newest row of each run recorded by this process
        self._subscribers: dict[str, list[Subscription]] = {}
        self._next_id = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recording_seconds = 0.0
        """Time spent recording on request paths (submission and engine thread)."""
        self.flush_seconds_total = 0.0
        """Time the background writer spent writing rows."""
        self.rows_recorded = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        largest = self.db.select(select(func.max(RunMetricRow.id)))[0]
        self._next_id = (largest or 0) + 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._writer, name="tuneforge-run-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.flush()

    def _writer(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def flush(self) -> int:
        """Write buffered rows to the table; returns how many were written."""
        with self._lock:
            batch = list(self._pending)
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            with self.db.session() as s:
                s.add_all([_to_db(row) for row in batch])
        except Exception:
            logger.exception("writing %d run metric rows failed; retrying later", len(batch))
            return 0
        with self._lock:
            del self._pending[:len(batch)]
        self.flush_seconds_total += time.perf_counter() - started
        return len(batch)

    # ---- recording (request paths) ------------------------------------------------------------

    def recording_encoder(self, model_id: str, inp: ForwardBackwardInput,
                          encode: Callable[[ForwardBackwardResult], bytes]
                          ) -> Callable[[ForwardBackwardResult], bytes]:
        """`encode`, also noting the result into `model_id`'s current step.

        Called when a forward_backward is submitted (not on the engine thread): the token and
        weight sums are taken here; the returned encoder runs on the engine thread."""
        started = time.perf_counter()
        submitted = time.monotonic()
        tokens = sum(len(d.tokens) for d in inp.data)
        weight_sum = 0.0
        for d in inp.data:
            weights = d.inputs.get("weights")
            weight_sum += (float(np.sum(weights, dtype=np.float64)) if weights is not None
                           else float(len(d.tokens)))
        self._add_time(time.perf_counter() - started)

        def encode_and_record(result: ForwardBackwardResult) -> bytes:
            payload = encode(result)
            t0 = time.perf_counter()
            try:
                run = self._runs.get(model_id)
                if run is None:
                    run = self._runs[model_id] = _RunState()
                if run.first_submitted is None:
                    run.first_submitted = submitted
                run.losses.append(float(result.metrics.get("loss:sum", 0.0)))
                run.tokens += tokens
                run.weight_sum += weight_sum
            except Exception:  # recording never fails a request
                logger.exception("recording forward_backward of %s failed", model_id)
            self._add_time(time.perf_counter() - t0)
            return payload

        return encode_and_record

    def optim_step(self, model_id: str, hp: AdamParams, metrics: dict[str, float]) -> None:
        """Close `model_id`'s current step into a row (engine thread)."""
        t0 = time.perf_counter()
        try:
            self._close_step(model_id, hp, metrics)
        except Exception:
            logger.exception("recording optim_step of %s failed", model_id)
        self._add_time(time.perf_counter() - t0)

    def _close_step(self, model_id: str, hp: AdamParams, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        run = self._runs.get(model_id)
        if run is None:
            run = self._runs[model_id] = _RunState()
        run.step += 1
        start = run.last_end if run.last_end is not None else run.first_submitted
        seconds = now - start if start is not None else None
        # np.sum, as the SDK sums the `loss:sum` of a call's chunks: the same value, bit for bit
        loss_sum = float(np.sum(run.losses)) if run.losses else 0.0
        row = {
            "id": 0, "run_id": model_id, "step": run.step,
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "loss": _finite(loss_sum / run.weight_sum) if run.weight_sum else None,
            "loss_sum": _finite(loss_sum), "tokens": run.tokens,
            "weight_sum": _finite(run.weight_sum),
            "lr": hp.learning_rate, "beta1": hp.beta1, "beta2": hp.beta2, "eps": hp.eps,
            "weight_decay": hp.weight_decay, "grad_clip_norm": hp.grad_clip_norm,
            "step_seconds": seconds,
            "tokens_per_second": _finite(run.tokens / seconds) if seconds else None,
        }
        for key, value in metrics.items():
            name = key.split(":", 1)[0]
            if name != "learning_rate" and name not in row:
                row[name] = _finite(float(value))
        run.losses, run.tokens, run.weight_sum = [], 0, 0.0
        run.first_submitted, run.last_end = None, now
        with self._lock:
            row["id"] = self._next_id
            self._next_id += 1
            self._pending.append(row)
            self._last[model_id] = row
            self.rows_recorded += 1
            subscribers = list(self._subscribers.get(model_id, ()))
        for sub in subscribers:
            try:
                sub.push(row)
            except RuntimeError:  # its event loop is closed: the server is stopping
                pass

    def forget(self, model_id: str) -> None:
        """Drop the accumulators of a run that is no longer loaded (its rows stay)."""
        self._runs.pop(model_id, None)

    def _add_time(self, seconds: float) -> None:
        with self._lock:
            self.recording_seconds += seconds

    # ---- reading ------------------------------------------------------------------------------

    def rows(self, run_id: str, after: int = 0, limit: int = 10_000) -> list[dict]:
        """Up to `limit` rows of `run_id` with id > `after`, oldest first, written or not."""
        with self._lock:  # buffered first: a row leaves the buffer only once it is in the table
            buffered = [r for r in self._pending if r["run_id"] == run_id and r["id"] > after]
        stored = self.db.select(select(RunMetricRow)
                                .where(RunMetricRow.run_id == run_id, RunMetricRow.id > after)
                                .order_by(RunMetricRow.id).limit(limit))
        merged = {row.id: _from_db(row) for row in stored}
        for row in buffered:
            merged.setdefault(row["id"], row)
        return [merged[i] for i in sorted(merged)][:limit]

    def latest(self, run_ids: list[str]) -> dict[str, dict]:
        """The newest row of each of `run_ids` that has one."""
        if not run_ids:
            return {}
        newest = (select(func.max(RunMetricRow.id)).where(RunMetricRow.run_id.in_(run_ids))
                  .group_by(RunMetricRow.run_id))
        out = {row.run_id: _from_db(row) for row in
               self.db.select(select(RunMetricRow).where(RunMetricRow.id.in_(newest)))}
        with self._lock:
            for run_id in run_ids:
                mine = self._last.get(run_id)
                if mine is not None and (run_id not in out or mine["id"] > out[run_id]["id"]):
                    out[run_id] = mine
        return out

    def subscribe(self, run_id: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(run_id, loop)
        with self._lock:
            self._subscribers.setdefault(run_id, []).append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subscribers.get(sub.run_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subscribers.pop(sub.run_id, None)

    def end_streams(self) -> None:
        """End every live reader (the server is stopping: an open stream would hold it)."""
        with self._lock:
            subs = [sub for group in self._subscribers.values() for sub in group]
        for sub in subs:
            try:
                sub.end()
            except RuntimeError:
                pass

    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subscribers.values())


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity (and PostgreSQL's JSON refuses them): those become null."""
    return x if math.isfinite(x) else None


def _to_db(row: dict) -> RunMetricRow:
    return RunMetricRow(id=row["id"], run_id=row["run_id"], step=row["step"],
                        time=dt.datetime.fromisoformat(row["time"]),
                        data={k: v for k, v in row.items() if k not in _COLUMNS})


def _from_db(row: RunMetricRow) -> dict:
    return {"id": row.id, "run_id": row.run_id, "step": row.step, **row.data}
