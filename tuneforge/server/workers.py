"""The engine workers the server drives, built from `Settings`.

Without `ray`: one in-process `Engine` behind one scheduler (the embedded default; Ray is not
imported). With `ray`: `workers` Ray actors, each behind its own scheduler, and one more
scheduler per data-parallel group; a heartbeat thread pings every actor, so a worker that dies
while idle is noticed too. Either way the server sees one `Dispatcher`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from tuneforge.engine.engine import Engine
from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import EngineError
from tuneforge.scheduler.futures import FutureStore
from tuneforge.scheduler.placement import Dispatcher
from tuneforge.scheduler.queue import Scheduler, Work
from tuneforge.settings import Settings
from tuneforge.storage.paths import DataPaths

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


def build(settings: Settings, registry: ModelRegistry, paths: DataPaths, futures: FutureStore,
          on_thread_start: Callable[[], None]) -> Dispatcher:
    def scheduler(engine, name: str, start: Callable[[], None] | None = None) -> Scheduler:
        return Scheduler(futures, engine, batch_tokens=settings.batch_tokens,
                         batch_wait=settings.batch_wait_ms / 1000,
                         batch_requests=settings.batch_requests, on_thread_start=start,
                         name=name)

    if settings.ray is None:
        engine = Engine.from_settings(settings, registry, paths.samplers, paths.offload)
        return Dispatcher(futures, [scheduler(engine, "engine", on_thread_start)])

    if settings.ray == "auto":
        # Ray binds every interface unless it takes the cluster for a local-only one; it reads
        # this when imported, in this process and in each one it starts.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from tuneforge.engine import ray_worker
    from tuneforge.engine.data_parallel import DataParallelGroup

    ray_worker.connect(settings)
    remote = ray_worker.start_workers(settings)
    groups, free = {}, list(remote)
    for base, k in settings.data_parallel.items():
        members, free = free[:k], free[k:]
        group = DataParallelGroup(members, f"dp-{base}", paths.root / "ray" / "groups")
        group.join()
        groups[base] = scheduler(group, group.name)
    dispatcher = Dispatcher(futures, [scheduler(w, w.name) for w in remote], groups)
    heartbeat = Heartbeat(remote)
    dispatcher.on_stop.append(heartbeat.stop)
    dispatcher.on_stop.append(lambda: ray_worker.shutdown(remote))
    return dispatcher


def preload(dispatcher: Dispatcher, names: list[str], timeout: float = 900.0) -> None:
    """Load base models on every worker before clients ask (each on its worker's thread)."""
    if not names:
        return
    futs = []
    for sched in dispatcher.workers:
        for name in names:
            fut = dispatcher.futures.create("LoadBaseModel", "")

            def job(engine, name=name) -> dict:
                engine.load_base(name)
                return {}

            futs.append(sched.submit(fut, Work(run=job)))
    deadline = time.monotonic() + timeout
    while any(f.state == "pending" for f in futs) and time.monotonic() < deadline:
        time.sleep(0.01)
    failed = [f.error for f in futs if f.state != "done"]
    if failed:
        raise EngineError(f"preload_models: {failed[0] or 'timed out'}")


def describe(dispatcher: Dispatcher) -> list[dict]:
    """Each worker's state for `/metrics` and `/api/system`."""
    out = []
    for sched in dispatcher.workers:
        engine, stats = sched.engine, sched.worker_stats
        local = isinstance(engine, Engine)
        out.append({
            "name": sched.name,
            "kind": "in-process" if local else "ray",
            "alive": bool(getattr(engine, "alive", True)),
            "pid": os.getpid() if local else engine.pid,
            "node": getattr(engine, "node", None),
            "losses": int(getattr(engine, "losses", 0)),
            "queue_depth": sched.depth,
            "models_placed": dispatcher.models_on(sched),
            "busy_seconds": round(sched.stats.busy_seconds, 6),
            "passes": sched.stats.passes,
            "sample_requests": sched.stats.sample_requests,
            "memory_bytes": stats.memory_bytes,
            "cuda_memory_bytes": stats.cuda_memory_bytes,
        })
    for base, sched in dispatcher.groups.items():
        out.append({
            "name": sched.name, "kind": "data-parallel", "base_model": base,
            "members": [m.name for m in sched.engine.members],
            "alive": all(m.alive for m in sched.engine.members),
            "queue_depth": sched.depth, "models_placed": dispatcher.models_on(sched),
            "busy_seconds": round(sched.stats.busy_seconds, 6), "passes": sched.stats.passes,
            "sample_requests": sched.stats.sample_requests,
        })
    return out


class Heartbeat:
    """Pings every Ray worker every few seconds from its own thread."""

    def __init__(self, workers: list) -> None:
        self.workers = workers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuneforge-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            for worker in self.workers:
                try:
                    worker.ping()
                except Exception:  # never let the heartbeat die
                    logger.exception("heartbeat of %s failed", worker.name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
