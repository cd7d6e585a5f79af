"""The server's components, built once from `Settings`, and owner-scoped lookups.

Lookups raise `NotFound` both for what does not exist and for what belongs to another key, so
one key can never learn whether another key's run or checkpoint exists.

The jobs this process runs are `tinker` SDK clients of this very server, which drops client
telemetry; so their clients send none (`TINKER_TELEMETRY=0`, unless the environment sets it).
Besides the wasted requests, the SDK keeps each closed session's telemetry, and with it that
session's HTTP clients and an open connection, in a process-wide cache of 100 entries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from tuneforge.engine import residency
from tuneforge.engine.models import ModelRegistry
from tuneforge.engine.worker import ModelInfo
from tuneforge.errors import Gone, LimitExceeded, NotFound, UserError
from tuneforge.scheduler.futures import Future, FutureStore
from tuneforge.scheduler.queue import Work
from tuneforge.server import workers
from tuneforge.server.load import EngineLoad
from tuneforge.server.run_metrics import RunMetrics
from tuneforge.server.seeds import DefaultSeeds
from tuneforge.settings import Settings
from tuneforge.storage import recovery
from tuneforge.storage.datadir import DataDir
from tuneforge.storage.db import CheckpointRow, SamplerRow, SessionRow, TrainingRunRow, utcnow

logger = logging.getLogger(__name__)

_DEDUPE_LIMIT = 65536
ACTIVITY_WRITE_SECONDS = 10.0


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        os.environ.setdefault("TINKER_TELEMETRY", "0")  # see the module docstring
        data = DataDir(settings.data_dir, settings.db_url)
        self.paths, self.db, self.keys, self.default_key = (data.paths, data.db, data.keys,
                                                            data.default_key)
        for key in settings.api_keys:
            self.keys.add(key, name="TUNEFORGE_API_KEYS")
        # with Ray the engine's weights live in the workers; the server reads tokenizers only
        self.registry = ModelRegistry.from_settings(settings, self.paths.models,
                                                    weights=settings.ray is None)
        self.futures = FutureStore(ttl_seconds=settings.result_ttl_seconds)
        # the engine workers, each behind its own scheduler: in-process, or Ray actors
        self.scheduler = workers.build(settings, self.registry, self.paths, self.futures,
                                       self._pin_threads)
        self.scheduler.on_models_lost = self._models_lost
        self.seeds = DefaultSeeds(settings.seed)
        self.run_metrics = RunMetrics(self.db)
        self.load = EngineLoad(
            lambda: sum(s.stats.busy_seconds for s in self.scheduler.schedulers),
            len(self.scheduler.workers))
        self.model_owners: dict[str, str] = {}
        self.model_lanes: dict[str, str] = {}  # model id -> its base model (its queue)
        self.model_info: dict[str, ModelInfo] = {}  # as created; answers get_info
        # idempotency for requests that are not ordered by seq_id: key -> future
        self._dedupe: OrderedDict[tuple, Future] = OrderedDict()
        self._dedupe_lock = threading.Lock()
        self._last_noted: dict[str, float] = {}
        from tuneforge.server.jobs import JobManager

        self.jobs = JobManager(self)

    def _pin_threads(self) -> None:
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)

    def start(self) -> None:
        self._pin_threads()
        report = recovery.recover(self.db, self.paths)
        if any(report.values()):
            logger.warning("recovered the data directory after an unclean stop: %s", report)
        self.run_metrics.start()
        self.scheduler.start()
        workers.preload(self.scheduler, self.settings.preload_models)
        self.jobs.start()

    def stop(self) -> None:
        self.jobs.stop()
        self.scheduler.stop()
        self.run_metrics.stop()  # after the engine: its last steps are written too
        self.db.close()

    # ---- idempotent submission ----------------------------------------------------------------

    def once(self, key: tuple, create) -> tuple[Future, bool]:
        """The future already submitted under `key`, or a new one from `create()`.

        Returns `(future, is_new)`.
        """
        with self._dedupe_lock:
            existing = self._dedupe.get(key)
            if existing is not None:
                return existing, False
            fut = create()
            self._dedupe[key] = fut
            while len(self._dedupe) > _DEDUPE_LIMIT:
                self._dedupe.popitem(last=False)
            return fut, True

    def finish_session(self, session_id: str, owner: str, reason: str) -> None:
        """Mark a session finished (once; the first reason stays) and free its models and
        samplers. Checkpoints stay: `create_training_client_from_state` brings a run back."""
        with self.db.session() as s:
            row = s.get(SessionRow, session_id)
            if row is None or row.finished_at is not None:
                return
            row.finished_at = utcnow()
            row.finish_reason = str(reason)[:32]
        self.release_session(session_id, owner)

    def release_session(self, session_id: str, owner: str) -> None:
        """Free the memory of a finished session's models and samplers (on the engine thread)."""
        prefix = f"{session_id}:"
        for model_id in [m for m in self.model_owners if m.startswith(prefix)]:
            self._forget_model(model_id)
            self.scheduler.close_model(model_id)

        def job(engine) -> dict:
            engine.drop(prefix)
            residency.return_free_memory()
            return {}

        self.scheduler.forget(prefix)
        self.scheduler.submit_everywhere("ReleaseSession", owner, job)
        self._forget_requests(prefix)

    def _forget_requests(self, prefix: str) -> None:
        """Drop the idempotency entries of a finished session's models and samplers (keyed by
        their ids, which start with the session's): no client of it sends again, and a server
        that runs many short sessions would otherwise keep them up to the limit. Their answers
        stay in the future store for its TTL."""
        with self._dedupe_lock:
            for key in [k for k in self._dedupe
                        if len(k) > 1 and isinstance(k[1], str) and k[1].startswith(prefix)]:
                del self._dedupe[key]

    def _forget_model(self, model_id: str) -> None:
        self.model_owners.pop(model_id, None)
        self.model_lanes.pop(model_id, None)
        self.model_info.pop(model_id, None)
        self._last_noted.pop(model_id, None)
        self.run_metrics.forget(model_id)

    def _models_lost(self, model_ids: list[str]) -> None:
        """Training models whose engine worker died: they no longer count as loaded (their
        next requests get the reason from the scheduler)."""
        for model_id in model_ids:
            self._forget_model(model_id)

    def note_activity(self, model_id: str) -> None:
        """Record a run's last request time, at most every few seconds (one DB write per
        optimizer step would be a noticeable part of a small step)."""
        now = time.monotonic()
        if now - self._last_noted.get(model_id, 0.0) < ACTIVITY_WRITE_SECONDS:
            return
        self._last_noted[model_id] = now
        with self.db.session() as s:
            row = s.get(TrainingRunRow, model_id)
            if row is not None:
                row.last_request_time = utcnow()

    # ---- owner-scoped lookups -----------------------------------------------------------------
    # Each raises NotFound both for what does not exist and for what another key owns.

    def visible(self, row_owner: str, owner: str) -> bool:
        return row_owner == owner or self.keys.is_admin(owner)

    def session(self, session_id: str, owner: str, active: bool = True) -> SessionRow:
        row = self.db.get(SessionRow, session_id) if isinstance(session_id, str) else None
        if row is None or not self.visible(row.owner, owner):
            raise NotFound(f"session {session_id!r} not found")
        if active and row.finished_at is not None:
            raise Gone(f"session {session_id!r} is finished")
        return row

    def run(self, model_id: str, owner: str) -> TrainingRunRow:
        row = self.db.get(TrainingRunRow, model_id) if isinstance(model_id, str) else None
        if row is None or not self.visible(row.owner, owner):
            raise NotFound(f"training run {model_id!r} not found")
        return row

    def check_model_owner(self, model_id: str, owner: str) -> None:
        loaded_by = self.model_owners.get(model_id)
        if loaded_by is None or not self.visible(loaded_by, owner):
            raise NotFound(self._not_loaded(model_id, owner))

    def _not_loaded(self, model_id: str, owner: str) -> str:
        row = self.db.get(TrainingRunRow, model_id) if isinstance(model_id, str) else None
        if row is not None and self.visible(row.owner, owner):
            lost = self.scheduler.lost_reason(model_id)
            if lost is not None:
                return lost
            return (f"training run {model_id!r} is not loaded: its session finished or the server "
                    "restarted since it was created; continue it from a checkpoint with "
                    "create_training_client_from_state")
        return f"model_id {model_id!r} is not a training model on this server"

    def check_model_quota(self, owner: str) -> None:
        """Refuse one more loaded training model for `owner` past `max_models_per_key`."""
        cap = self.settings.max_models_per_key
        if sum(1 for o in self.model_owners.values() if o == owner) >= cap:
            raise LimitExceeded(
                f"this API key already has {cap} training models loaded, the limit "
                f"max_models_per_key={cap}; finish a session (ServiceClient.close) to free them")

    def submit_for_model(self, owner: str, model_id: str, seq_id: int, request_type: str,
                         work: Work | Callable[[], dict | bytes]) -> Future:
        """Queue request `seq_id` of `model_id` (on the model's queue); an unknown or foreign
        model fails its future."""
        try:
            self.check_model_owner(model_id, owner)
        except NotFound as e:
            fut = self.futures.create(request_type, owner, model_id)
            self.futures.fail(fut, e.message, "user")
            return fut
        if not isinstance(work, Work):
            work = Work(run=work)
        work.lane, work.model_id = self.model_lanes.get(model_id, ""), model_id
        return self.scheduler.submit_ordered(model_id, seq_id, request_type, owner, work)

    def checkpoint(self, tinker_path: str, owner: str) -> CheckpointRow:
        parse_tinker_path(tinker_path)
        row = self.db.get(CheckpointRow, tinker_path)
        if row is None or not self.visible(row.owner, owner):
            raise NotFound(f"checkpoint {tinker_path!r} not found")
        return row

    def sampler(self, sampler_id: str, owner: str) -> SamplerRow:
        row = self.db.get(SamplerRow, sampler_id) if isinstance(sampler_id, str) else None
        if row is None or not self.visible(row.owner, owner):
            raise NotFound(f"sampler {sampler_id!r} not found")
        return row


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """`tinker://{run_id}/{kind}/{name}` → (run_id, kind, name)."""
    prefix = "tinker://"
    if not isinstance(path, str) or not path.startswith(prefix):
        raise UserError(f"path {path!r} is not a tinker:// path")
    parts = path[len(prefix):].split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"path {path!r} must look like tinker://RUN_ID/KIND/NAME")
    run_id, kind, name = parts
    return run_id, kind, name


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"
