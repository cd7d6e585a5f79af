"""The job layer as a server hosts it: the one module of tuneforge.jobs that server/ imports.

The server keeps jobs (their rows, queue, keys and file policy); this module does everything
that needs to know what a job is: parsing and checking a config, naming the files and code it
would use, running it (through the server's public API, with the SDK, like any client), its
schema, its preview, and reading what it wrote to its experiment folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.errors import NotFound, UserError
from tuneforge.jobs import preview as previews
from tuneforge.jobs import schema as schemas
from tuneforge.jobs.context import Cancelled, JobContext
from tuneforge.jobs.data import load_tasks
from tuneforge.jobs.registry import job_type
from tuneforge.jobs.report import evaluate_run
from tuneforge.jobs.rundir import RunDir
from tuneforge.jobs.runner import run_job
from tuneforge.jobs.spec import parse_spec, spec_to_dict

__all__ = ["Cancelled", "evaluate", "exported_adapter", "job_files", "listed_files", "log",
           "metrics", "parse", "preflight", "preview", "run", "saved_states", "schema",
           "spec_json", "task_metrics", "tasks", "user_code"]

Spec = Any  # a validated job spec (one of the job types' models)


def parse(raw: Any, base_dir: Path | None = None) -> Spec:
    """A validated spec; UserError (with `fields`) naming each option at fault."""
    return parse_spec(raw, base_dir)


def spec_json(spec: Spec) -> dict:
    return spec_to_dict(spec)


def job_files(spec: Spec) -> list[tuple[str, str]]:
    """(field, path) of every server file the spec names (check these before `listed_files`,
    which reads the listings among them)."""
    return job_type(spec.type).named_files(spec)


def listed_files(spec: Spec) -> list[tuple[str, str]]:
    """(what, path) of the files the named files list (an atomic batch's task folder)."""
    return job_type(spec.type).listed_files(spec)


def user_code(spec: Spec) -> str | None:
    """The Python code the job would run (a grader), if any."""
    return job_type(spec.type).user_code(spec)


def preflight(spec: Spec) -> None:
    """Read and check everything the job will use; UserError naming the field (and file:line)."""
    job_type(spec.type).preflight(spec)


def schema() -> dict:
    return schemas.schema()


_tokenizers: dict[str, tuple[Any, threading.Lock]] = {}
_tokenizers_lock = threading.Lock()


def preview(spec: Spec, tokenizer_dir: Path, folder: Path | None = None,
            limit: int = 20) -> dict:
    """The job's first `limit` rows as it trains on them (jobs/preview.py), with the tokenizer
    in `tokenizer_dir` (the served base model's)."""
    if not 1 <= limit <= previews.MAX_PREVIEW_ROWS:
        raise UserError(f"limit must be in [1, {previews.MAX_PREVIEW_ROWS}]",
                        fields=[{"field": "limit", "message": "out of range"}])
    key = str(tokenizer_dir)
    with _tokenizers_lock:
        if key not in _tokenizers:
            from transformers import AutoTokenizer

            _tokenizers[key] = (AutoTokenizer.from_pretrained(key), threading.Lock())
        tokenizer, lock = _tokenizers[key]
    with lock:  # a fast tokenizer must not be used by two threads at once
        return previews.preview(spec, tokenizer, folder, limit)


def run(spec: dict, folder: Path, *, base_url: str, api_key: str, job_id: str,
        cancel: threading.Event, stopping: threading.Event,
        on_progress: Callable[[dict], None]) -> dict:
    """Run (or continue) a job in `folder` against the server at `base_url` to the end and
    return its summary. Its SDK session ends with it, unless the server is stopping (then the
    job resumes when it starts again); Cancelled and errors are raised after that."""
    ctx = JobContext.connect(parse_spec(spec), RunDir(folder), base_url, api_key,
                             cancel=cancel, on_progress=on_progress, job_id=job_id)
    try:
        result = run_job(ctx)
    except BaseException as e:
        if not stopping.is_set():
            ctx.close("interrupted" if isinstance(e, Cancelled) else "errored")
        raise
    ctx.close("success")
    return result


def log(folder: Path, message: str) -> None:
    RunDir(folder).log(message)


def metrics(folder: Path) -> dict:
    """Per-step metrics, checkpoints and per-epoch history (an atomic batch: also each task's
    history under "tasks")."""
    run = RunDir(folder)
    out = {"metrics": run.rows("metrics.jsonl"), "checkpoints": run.rows("checkpoints.jsonl"),
           "history": run.history()}
    if (run.path / "summary.json").exists():
        out["tasks"] = {p.name: RunDir(p).history() for p in _task_folders(run.path)
                        if (p / "training_history.json").exists()}
    return out


def saved_states(folder: Path) -> list[tuple[int, str]]:
    """(step, tinker:// state path) of each training checkpoint the job saved, in order (the
    weights with their optimizer state, as the server stores them)."""
    return [(int(row["step"]), row["state_path"]) for row in RunDir(folder).rows(
        "checkpoints.jsonl") if row.get("state_path")]


def exported_adapter(folder: Path) -> Path | None:
    """The job's kept adapter in PEFT layout, once the job has exported it."""
    path = Path(folder) / "adapter"
    return path if path.is_dir() else None


def task_metrics(folder: Path, name: str) -> dict:
    """One task's metrics, history, checkpoints (and its metadata and evaluation report once it
    has ended)."""
    tasks = {p.name: p for p in _task_folders(Path(folder))}
    if name not in tasks:  # only a folder the batch made: no path is built from `name`
        raise NotFound(f"no task {name!r} in this job")
    run = RunDir(tasks[name])
    out = {"metrics": run.rows("metrics.jsonl"), "history": run.history(),
           "checkpoints": run.rows("checkpoints.jsonl")}
    meta = run.path / "metadata.json"
    if meta.exists():
        out["metadata"] = {k: v for k, v in json.loads(meta.read_text()).items()
                           if k != "traceback"}
    report = run.path / "eval_report.json"
    if report.exists():
        out["report"] = json.loads(report.read_text())
    return out


SPARKLINE_POINTS = 60


def tasks(folder: Path, spec: dict) -> list[dict]:
    """Every task of an atomic batch, in its order: status (queued until its folder exists,
    then running, then what its metadata says), epochs, early stop, best held-out loss, and its
    train loss per step (at most SPARKLINE_POINTS of them, evenly spaced)."""
    folders = {p.name: p for p in _task_folders(Path(folder))}
    try:
        names = [t["name"] for t in load_tasks(parse(spec).tasks)]
    except (UserError, OSError):  # files that moved since it was accepted: what ran is there
        names = []
    names += [n for n in folders if n not in names]
    out = []
    for name in names:
        entry: dict = {"name": name, "status": "queued", "epochs_trained": 0,
                       "early_stopped": False, "best_eval_loss": None, "losses": []}
        if name in folders:
            run = RunDir(folders[name])
            history = run.history()
            evals = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
            losses = [r["loss"] for r in run.rows("metrics.jsonl") if "loss" in r]
            stride = max(1, -(-len(losses) // SPARKLINE_POINTS))
            entry.update(status="running", epochs_trained=len(history),
                         best_eval_loss=min(evals) if evals else None,
                         losses=losses[::stride])
            meta = run.path / "metadata.json"
            if meta.exists():
                m = json.loads(meta.read_text())
                entry.update(status=m.get("status", "running"), error=m.get("error"),
                             epochs_trained=m.get("epochs_trained", entry["epochs_trained"]),
                             early_stopped=bool(m.get("early_stopped")),
                             best_eval_loss=m.get("best_eval_loss", entry["best_eval_loss"]))
        out.append(entry)
    return out


def _task_folders(folder: Path) -> list[Path]:
    root = folder / "tasks"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def evaluate(base_url: str, api_key: str | None, folder: Path, **options: Any) -> dict:
    """Evaluate the job's adapter (report.py: data_source, baseline, baseline_folder, task,
    samples) through the server at `base_url`; the report is also written to evaluation.json."""
    import tinker

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    try:
        report = evaluate_run(service, Path(folder), **options)
    finally:
        try:
            service.close("success").result(timeout=60)
        except Exception:  # the server may be stopping; nothing is lost
            pass
    RunDir(Path(folder)).write("evaluation.json", report)
    return report
