"""What a running job holds: its spec, folder, SDK clients, progress and cancellation.

A job talks to a tuneforge server only through the `tinker` SDK, exactly like a user's script.
Its training clients carry `user_metadata={"job_id": ...}` when the job has an id (a job run by
the server), so the server's run list links each training run to the job that made it, and
`"gradient_checkpointing": "true"` when the job asks for it (nothing when it does not, so the
server's own setting applies), and `lora_alpha` / `lora_dropout` when the job sets them.

Every context owns its SDK connections and `close` releases them all: the session ends (the
server frees its models and samplers) and the HTTP clients close. Its REST client therefore runs
over the ServiceClient's own connections, not over the SDK's process-wide ones for the API key,
which are never closed: a job's key is its own, so each job would otherwise leave open
connections behind for the life of the server.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tinker

from tuneforge.jobs.rundir import RunDir


class Cancelled(Exception):
    """The job was cancelled, or the server is stopping (then it resumes on restart)."""


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    started: float = field(default_factory=time.monotonic)
    first_step: int = 0  # steps already done when this process started (resume)

    def snapshot(self) -> dict:
        frac = self.step / self.total_steps if self.total_steps else 0.0
        done_here = self.step - self.first_step
        eta = None
        if done_here > 0 and self.total_steps:
            eta = (time.monotonic() - self.started) / done_here * (self.total_steps - self.step)
        return {"progress": round(min(frac, 1.0), 4), "step": self.step,
                "total_steps": self.total_steps, "epoch": self.epoch, "loss": self.loss,
                "eta_seconds": None if eta is None else round(eta, 1)}


@dataclass
class JobContext:
    """What a running job needs: the spec, its folder, the SDK and the way to report."""

    spec: Any
    run: RunDir
    service: tinker.ServiceClient
    rest_client: tinker.RestClient | None = None  # made on first use (see `rest`)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[dict], None] | None = None
    progress: Progress = field(default_factory=Progress)
    base_url: str | None = None
    api_key: str | None = None
    job_id: str | None = None

    @classmethod
    def connect(cls, spec, run: RunDir, base_url: str, api_key: str | None,
                **kw) -> JobContext:
        return cls(spec=spec, run=run,
                   service=tinker.ServiceClient(base_url=base_url, api_key=api_key),
                   base_url=base_url, api_key=api_key, **kw)

    @property
    def rest(self) -> tinker.RestClient:
        """A RestClient over the ServiceClient's session-less connections, which `close`
        closes. (`tinker.RestClient(base_url=..., api_key=...)` would use connections kept for
        the life of the process, one set per API key.)"""
        if self.rest_client is None:
            with warnings.catch_warnings():  # deprecated for scripts, which may share the
                warnings.simplefilter("ignore", FutureWarning)  # process-wide connections
                self.rest_client = self.service.create_rest_client()
        return self.rest_client

    @property
    def user_metadata(self) -> dict[str, str] | None:
        """What the job's training clients carry: its id, so the server links its runs to the
        job, and the per-run switches the server reads from user_metadata."""
        meta = {"job_id": self.job_id} if self.job_id else {}
        if getattr(self.spec, "gradient_checkpointing", False):
            meta["gradient_checkpointing"] = "true"
        if getattr(self.spec, "lora_alpha", None) is not None:
            meta["lora_alpha"] = repr(float(self.spec.lora_alpha))
        # a run loaded from a checkpoint keeps the checkpoint's dropout unless told: the job's
        # own (even 0) wins there
        if getattr(self.spec, "lora_dropout", 0.0) or getattr(self.spec, "load_checkpoint_path",
                                                               None):
            meta["lora_dropout"] = repr(float(getattr(self.spec, "lora_dropout", 0.0)))
        return meta or None

    def close(self, status: str) -> None:
        """End this context's SDK session (the server frees its training models and samplers;
        an unfinished session would hold them, and count against the key's model cap) and close
        its HTTP clients, the REST client's too."""
        try:
            self.service.close(status).result(timeout=60)
        except Exception:  # the server may be gone (stopping); nothing is lost
            pass

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def report(self) -> None:
        if self.on_progress:
            self.on_progress(self.progress.snapshot())

    def child(self, spec, path: Path, progress: Progress) -> JobContext:
        """A context for one part of this job (an atomic task) with its own SDK session, so
        the part's models are freed when it closes (this context must come from `connect`)."""
        return JobContext.connect(spec, RunDir(path), self.base_url, self.api_key,
                                  cancel=self.cancel, progress=progress, job_id=self.job_id)
