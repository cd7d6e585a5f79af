"""Placement: which engine worker serves which training model and sampler.

The server has one `Scheduler` per engine worker: one in-process engine by default; with Ray,
one per worker actor, plus one per data-parallel group (a base model's runs spread over K
workers). The `Dispatcher` is what the server submits to. It keeps the `Scheduler` interface
(submit, submit_ordered, open_model, …) and sends each request to its worker:

- a new training model goes to its base model's data-parallel group if it has one, else to the
  least-loaded live worker, preferring workers that already hold its base model; all its
  requests go there afterwards (so `seq_id` order and cross-adapter batching stay within one
  worker);
- a sampler of a training model's weights goes where that model is; other samplers (base
  models, checkpoints) go, on first use, to the least-loaded worker holding their base model.

A worker that is lost (its process died) takes its training models with it: their next
requests fail with a message naming the loss and the way back (a new training client from the
last checkpoint), and its samplers are placed anew on their next use. Other workers' clients
never notice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tuneforge.engine.worker import WorkerStats
from tuneforge.scheduler.futures import Future, FutureStore
from tuneforge.scheduler.queue import Scheduler, Work
from tuneforge.scheduler.stats import Stats

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, futures: FutureStore, workers: list[Scheduler],
                 groups: dict[str, Scheduler] | None = None) -> None:
        """`workers`: one scheduler per engine worker; `groups`: base model → the scheduler of
        its data-parallel group."""
        self.futures = futures
        self.workers = workers
        self.groups = dict(groups or {})
        self._lock = threading.Lock()
        self._models: dict[str, Scheduler] = {}
        self._samplers: dict[str, Scheduler] = {}
        self._lost: dict[str, str] = {}  # model id -> why it is gone
        self.on_models_lost: Callable[[list[str]], None] = lambda model_ids: None
        self.on_stop: list[Callable[[], None]] = []  # after the schedulers stopped
        for sched in self.schedulers:
            if hasattr(sched.engine, "add_lost_listener"):  # engines in other processes
                sched.engine.add_lost_listener(lambda why, s=sched: self.worker_lost(s, why))

    @property
    def schedulers(self) -> list[Scheduler]:
        return self.workers + [g for g in self.groups.values() if g not in self.workers]

    # ---- lifecycle (the Scheduler interface) ---------------------------------------------------

    def start(self) -> None:
        for sched in self.schedulers:
            sched.start()

    def stop(self, timeout: float = 10.0) -> None:
        for sched in self.schedulers:
            sched.stop(timeout)
        for hook in self.on_stop:
            hook()

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.schedulers)

    def depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sched in self.schedulers:
            for lane, n in sched.depths().items():
                out[lane] = out.get(lane, 0) + n
        return out

    def worker_stats(self) -> WorkerStats:
        """All workers' last stats, added up."""
        if len(self.workers) == 1:
            return self.workers[0].worker_stats
        return WorkerStats.total([s.worker_stats for s in self.workers])

    def models_on(self, sched: Scheduler) -> int:
        with self._lock:
            return sum(1 for s in self._models.values() if s is sched)

    @property
    def stats(self) -> Stats:
        if len(self.schedulers) == 1:
            return self.schedulers[0].stats
        return Stats.total([s.stats for s in self.schedulers])

    # ---- placement ---------------------------------------------------------------------------

    def open_model(self, model_id: str, base_model: str, next_seq: int = 1) -> None:
        """Place a new training model and start ordering its requests."""
        with self._lock:
            sched = self._models.get(model_id)
            if sched is None:
                sched = self.groups.get(base_model) or self._least_loaded(base_model)
                self._models[model_id] = sched
                self._lost.pop(model_id, None)
        sched.open_model(model_id, next_seq)

    def close_model(self, model_id: str) -> None:
        with self._lock:
            sched = self._models.pop(model_id, None)
            self._lost.pop(model_id, None)
        if sched is not None:
            sched.close_model(model_id)

    def place_sampler(self, sampler_id: str, model_id: str) -> None:
        """Samples of `sampler_id` run where `model_id` is (a snapshot of its weights)."""
        with self._lock:
            sched = self._models.get(model_id)
            if sched is not None:
                self._samplers[sampler_id] = sched

    def forget(self, prefix: str) -> None:
        """Forget the placed samplers and lost models whose ids start with `prefix` (those of a
        finished session)."""
        with self._lock:
            for table in (self._samplers, self._lost):
                for key in [k for k in table if k.startswith(prefix)]:
                    del table[key]

    def worker_of(self, model_id: str) -> str | None:
        with self._lock:
            sched = self._models.get(model_id)
        return sched.name if sched is not None else None

    def lost_reason(self, model_id: str) -> str | None:
        with self._lock:
            return self._lost.get(model_id)

    def _least_loaded(self, base_model: str) -> Scheduler:
        """Caller holds the lock."""
        def load(s: Scheduler) -> tuple:
            models = sum(1 for m in self._models.values() if m is s)
            fresh_load = models > 0 and base_model not in s.worker_stats.base_models
            down = not getattr(s.engine, "alive", True)  # lost, and not answering again yet
            return (down, fresh_load, models + s.depth, self.workers.index(s))

        return min(self.workers, key=load)

    def _for_work(self, work: Work) -> Scheduler:
        with self._lock:
            if work.model_id is not None and work.model_id in self._models:
                return self._models[work.model_id]
            if work.sampler_id is not None:
                sched = self._samplers.get(work.sampler_id)
                if sched is None:
                    sched = self.groups.get(work.lane) or self._least_loaded(work.lane)
                    self._samplers[work.sampler_id] = sched
                return sched
            return self.workers[0]

    # ---- submission --------------------------------------------------------------------------

    def submit(self, fut: Future, work: Work) -> Future:
        return self._for_work(work).submit(fut, work)

    def submit_everywhere(self, request_type: str, owner: str,
                          run: Callable[[object], dict]) -> None:
        """Queue `run` on every worker (e.g. to free what a finished session held)."""
        for sched in self.schedulers:
            sched.submit(self.futures.create(request_type, owner), Work(run=run))

    def submit_ordered(self, model_id: str, seq_id: int, request_type: str, owner: str,
                       work: Work) -> Future:
        with self._lock:
            sched, lost = self._models.get(model_id), self._lost.get(model_id)
        if lost is not None or sched is None:
            fut = self.futures.create(request_type, owner, model_id)
            self.futures.fail(fut, lost or f"model_id {model_id!r} is not a training model on "
                              "this server", "server" if lost else "user")
            return fut
        return sched.submit_ordered(model_id, seq_id, request_type, owner, work)

    # ---- faults ------------------------------------------------------------------------------

    def worker_lost(self, sched: Scheduler, why: str) -> None:
        """The worker behind `sched` died: forget what it held (called on its thread)."""
        with self._lock:
            gone = [m for m, s in self._models.items() if s is sched]
            for model_id in gone:
                del self._models[model_id]
                self._lost[model_id] = lost_message(model_id, sched.name, why)
            for sampler_id in [k for k, s in self._samplers.items() if s is sched]:
                del self._samplers[sampler_id]
        for model_id in gone:
            sched.close_model(model_id)
        with self._lock:
            messages = {m: self._lost[m] for m in gone}
        sched.fail_queued(set(gone), messages)
        logger.error("engine worker %s was lost (%s); %d training models with it: %s",
                     sched.name, why, len(gone), ", ".join(gone) or "-")
        if gone:
            self.on_models_lost(gone)


def lost_message(model_id: str, worker: str, why: str) -> str:
    return (f"worker lost: training run {model_id} was on engine worker {worker}, which went away "
            f"({why}); continue it from its last checkpoint with "
            "create_training_client_from_state_with_optimizer")
