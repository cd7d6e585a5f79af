"""The job manager: declarative jobs (tuneforge.jobs) run in the server process, persisted.

The job layer is a client of this server; the manager reaches it only through its host
interface (tuneforge.jobs.host): parsing and checking a config, running it, its preview.

A job runs in its own thread and calls this server over loopback through the `tinker` SDK, with
a key of its own that acts for the key that submitted it (so its runs and checkpoints belong to
that key, and revoking that key stops the job's access too). At most `max_running_jobs` run at
once; the rest wait in submission order.

Persistence: the job's row (spec, status, progress, result) is in the metadata database and its
files in `data_dir/experiments/JOB_ID`. When the server stops (cleanly or not) a running job is
left "running"; the next start picks it up again and the runner continues from the last
checkpoint in its folder.

Other front doors onto the same jobs (the agent-skill REST API, server/skill.py) submit through
`submit` with an id prefix of their own, and may register `on_end` callbacks: each runs in the
job's thread when the job has ended (completed, failed or cancelled while running), before the
status says so, so what a callback writes is there once a client sees the job ended.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from tuneforge.engine import residency
from tuneforge.errors import NotFound, UserError
from tuneforge.jobs import host
from tuneforge.storage.db import JobRow, TrainingRunRow, utcnow

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
PROGRESS_WRITE_SECONDS = 1.0


class JobManager:
    def __init__(self, state) -> None:
        self.state = state
        self.db = state.db
        self.root = state.paths.experiments
        self.max_running = state.settings.max_running_jobs
        self._slots = threading.Semaphore(self.max_running)
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._on_end: list[Callable[[JobRow, str], None]] = []

    @property
    def base_url(self) -> str:
        host = self.state.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{host}:{self.state.settings.port}"

    # ---- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        rows = self.db.select(select(JobRow).where(JobRow.status.in_(ACTIVE))
                              .order_by(JobRow.created_at))
        for row in rows:
            if row.status == "running":
                with self.db.session() as s:
                    s.get(JobRow, row.id).restarts += 1
                logger.info("job %s resumes after a server restart", row.id)
            self._launch(row.id)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop running jobs without ending them: they resume when the server starts again."""
        self._stopping.set()
        for event in list(self._cancel.values()):
            event.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- requests ------------------------------------------------------------------------------

    def parse(self, raw: dict):
        """A config checked as a job from HTTP: valid, and using only what this server lets
        such a job read and run."""
        files_dir = self.state.settings.job_files_dir
        spec = host.parse(raw, base_dir=files_dir.resolve() if files_dir else None)
        self.check_access(spec)
        return spec

    def on_end(self, callback: Callable[[JobRow, str], None]) -> None:
        """Call `callback(row, status)` as each job ends (see the module docstring); an error in
        it is logged and changes nothing about the job."""
        self._on_end.append(callback)

    def submit(self, owner: str, raw: dict, prefix: str = "job") -> JobRow:
        """Accept a job; its id is `PREFIX-` and 12 hex digits."""
        spec = self.parse(raw)
        host.preflight(spec)
        job_id = f"{prefix}-{secrets.token_hex(6)}"
        row = JobRow(id=job_id, owner=owner, name=spec.name or job_id, type=spec.type,
                     spec=host.spec_json(spec), status="queued", progress={"progress": 0.0},
                     folder=str(self.root / job_id))
        row.key = self.state.keys.issue_job_key(job_id, owner)
        self.db.add(row)
        self._launch(job_id)
        return row

    def check_access(self, spec) -> None:
        """Jobs from HTTP read server files only inside `job_files_dir`, and run user code only
        when `allow_job_code` is set."""
        for field, path in host.job_files(spec):
            self.check_file(field, path)
        for what, path in host.listed_files(spec):  # read once the listing itself is allowed
            self.check_file(what, path)
        code = host.user_code(spec)
        if code is not None and not self.state.settings.allow_job_code:
            message = (f"{code!r} is Python code this server would run; it accepts only "
                       "exact_match and boxed_number (the operator can allow code with "
                       "TUNEFORGE_ALLOW_JOB_CODE=1)")
            raise UserError(f"grader: {message}", fields=[{"field": "grader",
                                                            "message": message}])

    def check_file(self, field: str, path: str) -> str:
        """`path` (relative ones: to `job_files_dir`) if it lies inside that folder."""
        files_dir = self.state.settings.job_files_dir
        if files_dir is None:
            message = ("this server reads no files for jobs; send the rows inline (`tuneforge "
                       "jobs submit` does), or the operator sets TUNEFORGE_JOB_FILES_DIR")
            raise UserError(f"{field}: {message}", fields=[{"field": field, "message": message}])
        root = files_dir.resolve()
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            message = f"{path!r} is outside the job files folder of this server ({root})"
            raise UserError(f"{field}: {message}", fields=[{"field": field, "message": message}])
        return str(full)

    def preview(self, spec, folder: Path | None, limit: int) -> dict:
        """The job's rows as it trains on them, with the served base model's tokenizer."""
        try:
            tokenizer_dir = self.state.registry.resolve(spec.base_model)
        except UserError as e:
            e.fields = e.fields or [{"field": "base_model", "message": e.message}]
            raise
        return host.preview(spec, tokenizer_dir, folder, limit)

    def runs(self, row: JobRow) -> list[str]:
        """Ids of the training runs the job made (they carry its id in their metadata)."""
        runs = self.db.select(select(TrainingRunRow)
                              .where(TrainingRunRow.owner == row.owner,
                                     TrainingRunRow.created_at >= row.created_at)
                              .order_by(TrainingRunRow.created_at))
        return [r.id for r in runs if (r.user_metadata or {}).get("job_id") == row.id]

    def get(self, owner: str, job_id: str) -> JobRow:
        row = self.db.get(JobRow, job_id)
        if row is None or (row.owner != owner and not self.state.keys.is_admin(owner)):
            raise NotFound(f"no job {job_id!r}")
        return row

    def cancel(self, owner: str, job_id: str) -> JobRow:
        row = self.get(owner, job_id)
        if row.status not in ACTIVE:
            return row
        with self._lock:
            event = self._cancel.get(job_id)
        if event is not None:
            event.set()
        with self.db.session() as s:
            live = s.get(JobRow, job_id)
            if live.status == "queued":  # not started: it ends here
                self._end(s, live, "cancelled")
        return self.db.get(JobRow, job_id)

    # ---- the job thread ------------------------------------------------------------------------

    def _launch(self, job_id: str) -> None:
        event = threading.Event()
        thread = threading.Thread(target=self._run, args=(job_id, event), daemon=True,
                                  name=f"job-{job_id}")
        with self._lock:
            self._cancel[job_id] = event
            self._threads[job_id] = thread
        thread.start()

    def _run(self, job_id: str, cancel: threading.Event) -> None:
        try:
            with self._slots:
                if cancel.is_set():
                    return
                self._execute(job_id, cancel)
        except Exception:
            logger.exception("job %s: manager error", job_id)
        finally:
            with self._lock:
                self._cancel.pop(job_id, None)
                self._threads.pop(job_id, None)

    def _execute(self, job_id: str, cancel: threading.Event) -> None:
        row = self.db.get(JobRow, job_id)
        if row is None or row.status not in ACTIVE:
            return
        with self.db.session() as s:
            live = s.get(JobRow, job_id)
            live.status = "running"
            live.started_at = live.started_at or utcnow()
        folder = Path(row.folder)
        last_write = [0.0]

        def on_progress(snapshot: dict) -> None:
            now = time.monotonic()
            if now - last_write[0] < PROGRESS_WRITE_SECONDS and snapshot.get("progress") != 1.0:
                return
            last_write[0] = now
            with self.db.session() as s:
                live = s.get(JobRow, job_id)
                if live is not None:
                    live.progress = snapshot

        try:
            self._wait_for_server(cancel)
            result = host.run(row.spec, folder, base_url=self.base_url, api_key=row.key,
                              job_id=job_id, cancel=cancel, stopping=self._stopping,
                              on_progress=on_progress)
        except host.Cancelled:
            if self._stopping.is_set():
                host.log(folder, "server stopping: the job continues when it starts again")
                return
            host.log(folder, "cancelled")
            self._ended(job_id, "cancelled")
            self._finish(job_id, "cancelled")
            return
        except Exception as e:
            if self._stopping.is_set():
                host.log(folder, f"server stopping ({type(e).__name__}): the job continues "
                         "when it starts again")
                return
            message = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            host.log(folder, f"failed: {message}\n{traceback.format_exc()}")
            self._ended(job_id, "failed")
            self._finish(job_id, "failed", error=message[:4000])
            return
        self._ended(job_id, "completed")
        self._finish(job_id, "completed", result=result)

    def _ended(self, job_id: str, status: str) -> None:
        """What runs as a job ends, before its status says so."""
        row = self.db.get(JobRow, job_id)
        for callback in self._on_end:
            try:
                callback(row, status)
            except Exception:
                logger.exception("job %s: an end-of-job callback failed", job_id)
        # The SDK leaves each session's one-off configuration client unclosed, in reference
        # cycles that only a full collection frees (with their open connections); then the
        # memory the job's sessions freed goes back to the system.
        gc.collect()
        residency.return_free_memory()

    def _wait_for_server(self, cancel: threading.Event, timeout: float = 120.0) -> None:
        """Jobs resumed at start-up begin before the server listens: wait until it answers."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancel.is_set():
                raise host.Cancelled()
            try:
                if httpx.get(f"{self.base_url}/api/v1/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server at {self.base_url} did not answer")

    def _finish(self, job_id: str, status: str, result: dict | None = None,
                error: str | None = None) -> None:
        with self.db.session() as s:
            self._end(s, s.get(JobRow, job_id), status, result, error)

    def _end(self, s, row: JobRow, status: str, result: dict | None = None,
             error: str | None = None) -> None:
        row.status = status
        row.finished_at = utcnow()
        row.result = result
        row.error = error
        row.key = None
        if status == "completed":
            row.progress = {**(row.progress or {}), "progress": 1.0, "eta_seconds": 0.0}
        self.state.keys.drop_job_keys(row.id)

