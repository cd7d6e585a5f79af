"""Atomic batches: one small SFT adapter per task, trained concurrently on the shared base model.

Each task gets its own folder under `tasks/NAME/` (config, log, metrics, checkpoints,
`training_history.json`, `metadata.json`, the adapter) and runs the same supervised loop as an
`sft` job, with early stopping when the job sets `patience`. A task that fails records its
traceback in its metadata; the others go on. `summary.json` lists every task. A resumed batch
skips tasks that already finished and continues the others from their checkpoints.

Beside it, `atomic_lora_training_summary.json` holds the same results in the layout of the
atomic-LoRA workflow (a batch of per-task adapters analysed afterwards), rewritten as each task
ends, so that a batch that stops part-way leaves the tasks done so far:

    {"completed": N, "failed": M, "tasks": {NAME: {"status": "success", "final_loss": float,
     "epochs": int, "metadata": {"num_examples": int, "num_epochs_trained": int,
     "training_time_seconds": float, "early_stopped": bool}}, ...}}

with a failed task as {"status": "failed", "error": str, "traceback": str}. As in that
workflow, `final_loss` is the mean training loss of the epoch whose adapter is kept (the best
held-out epoch when the task evaluates, else the last), `epochs` the epochs trained, and
`num_examples` the examples trained on. Each epoch in a task's `training_history.json` carries
its mean training loss also as `loss`, that workflow's name for it.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Literal

from tuneforge.errors import UserError
from tuneforge.jobs import data
from tuneforge.jobs.context import Cancelled, JobContext, Progress
from tuneforge.jobs.jobtype import JobType, PreviewRow, blame
from tuneforge.jobs.rundir import RunDir
from tuneforge.jobs.spec import (
    TRAIN_ON,
    TRAIN_ON_HELP,
    Common,
    DataSource,
    option,
    parse_spec,
    resolve_path,
    spec_to_dict,
)
from tuneforge.jobs.supervised import Supervised, preview_chat, train_supervised

DONE = ("completed", "failed")
SUMMARY = "atomic_lora_training_summary.json"
TASK_OVERRIDES = ("learning_rate", "learning_rate_scale", "lora_rank", "epochs", "batch_size",
                  "gradient_accumulation_steps", "patience", "min_delta", "eval_split",
                  "eval_every", "max_length", "seed")


class AtomicSpec(Common):
    """Many small SFT adapters, one per task, trained at once on the shared base model; a
    failing task records its error and the others go on."""

    held_out_per_task: ClassVar[bool] = True

    type: Literal["atomic"]
    tasks: DataSource = option(..., "a folder of TASK.jsonl files, or a JSONL (or list) of "
                               "{name, data, ...overrides}", group="data")
    max_concurrent: int = option(8, "tasks trained at the same time", group="tasks", ge=1,
                                 le=256)
    train_on: Literal[TRAIN_ON] = option(  # type: ignore[valid-type]
        "last_assistant_message", TRAIN_ON_HELP, group="data")


def task_spec(parent, task: dict):
    unknown = set(task) - {"name", "data", *TASK_OVERRIDES}
    if unknown:
        raise ValueError(f"task {task['name']!r}: unknown option(s) {', '.join(sorted(unknown))}"
                         f" (a task may set: {', '.join(TASK_OVERRIDES)})")
    base = spec_to_dict(parent)
    for key in ("type", "tasks", "max_concurrent"):
        base.pop(key, None)
    for one, other in (("learning_rate", "learning_rate_scale"),
                       ("learning_rate_scale", "learning_rate")):
        if one in task:  # a task's own learning rate replaces the batch's, in either form
            base.pop(other, None)
    raw = {**base, **{k: v for k, v in task.items() if k in TASK_OVERRIDES}, "type": "sft",
           "name": task["name"], "data": task["data"]}
    return parse_spec(raw)


def run(ctx: JobContext) -> dict:
    spec = ctx.spec
    tasks = data.load_tasks(spec.tasks)
    root = ctx.run.path / "tasks"
    progress = {t["name"]: Progress() for t in tasks}
    finished: set[str] = set()
    lock = threading.Lock()
    started = time.monotonic()
    entries: dict[str, dict] = {}  # the atomic-LoRA summary's, as tasks end
    ctx.run.log(f"atomic batch of {len(tasks)} tasks, {spec.max_concurrent} at a time")

    def ended(name: str, meta: dict) -> None:
        entry = summary_entry(meta, root / name)
        with lock:
            finished.add(name)
            entries[name] = entry
            ctx.run.write(SUMMARY, lora_summary(entries))

    def report() -> None:
        if not ctx.on_progress:
            return
        with lock:
            fracs = [1.0 if name in finished else
                     (p.step / p.total_steps if p.total_steps else 0.0)
                     for name, p in progress.items()]
            frac = sum(fracs) / len(fracs)
            elapsed = time.monotonic() - started
            ctx.on_progress({
                "progress": round(frac, 4), "step": sum(p.step for p in progress.values()),
                "total_steps": sum(p.total_steps for p in progress.values()), "epoch": None,
                "loss": None, "tasks_done": len(finished), "tasks": len(tasks),
                "eta_seconds": round(elapsed / frac * (1 - frac), 1) if frac > 0 else None})

    def one(task: dict) -> dict:
        name = task["name"]
        folder = RunDir(root / name)
        meta_path = folder.path / "metadata.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("status") in DONE:
                ended(name, meta)
                return meta
        t0 = time.monotonic()
        meta = {"name": name, "status": "running"}
        child = None
        try:
            tspec = task_spec(spec, task)
            child = ctx.child(tspec, folder.path, progress[name])
            child.on_progress = lambda _snap: report()
            child.run.write_config(tspec)
            train, held_out = _sft().split(tspec)
            out = train_supervised(child, Supervised(child, train, held_out, spec.train_on),
                                   tag=f"[{name}] ")
            history = [{**h, "loss": h["train_loss"]} for h in child.run.history()]
            child.run.write("training_history.json", history)
            meta.update(status="completed", examples=out["examples"],
                        train_examples=len(train), learning_rate=out["learning_rate"],
                        training_seconds=round(time.monotonic() - t0, 3),
                        epochs_trained=out["epochs_trained"], steps=out["steps"],
                        early_stopped=out["early_stopped"], best_epoch=out["best_epoch"],
                        best_eval_loss=out["best_eval_loss"],
                        first_train_loss=out["first_train_loss"],
                        last_train_loss=out["last_train_loss"], adapter=out["adapter"],
                        sampler_path=out["sampler_path"], eval_loss=out["eval"]["loss"])
        except Cancelled:
            raise
        except Exception as e:
            meta.update(status="failed", error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc())
            ctx.run.log(f"[{name}] failed: {type(e).__name__}: {e}")
        finally:
            if child is not None:
                child.close("success" if meta["status"] == "completed" else "errored")
        meta["wall_seconds"] = round(time.monotonic() - t0, 2)
        folder.write("metadata.json", meta)
        ended(name, meta)
        report()
        return meta

    with ThreadPoolExecutor(max_workers=spec.max_concurrent,
                            thread_name_prefix="atomic-task") as pool:
        results = list(pool.map(one, tasks))
    summary = {"tasks": len(results),
               "completed": sum(r["status"] == "completed" for r in results),
               "failed": sum(r["status"] == "failed" for r in results),
               "early_stopped": sum(bool(r.get("early_stopped")) for r in results),
               "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results]}
    ctx.run.write("summary.json", summary)
    ctx.run.write(SUMMARY, lora_summary({t["name"]: entries[t["name"]] for t in tasks}))
    ctx.run.log(f"atomic batch done: {summary['completed']} completed, {summary['failed']} "
                f"failed, {summary['early_stopped']} stopped early")
    return {k: v for k, v in summary.items() if k != "results"}


def summary_entry(meta: dict, folder: Path) -> dict:
    """One task of `atomic_lora_training_summary.json` (see the module docstring), from its
    metadata and training history."""
    if meta["status"] != "completed":
        return {"status": "failed", "error": meta.get("error"), "traceback": meta.get("traceback")}
    history = RunDir(folder).history()
    kept = meta.get("best_epoch") or (history[-1]["epoch"] if history else None)
    losses = [h["train_loss"] for h in history if h.get("epoch") == kept]
    epochs = int(meta["epochs_trained"])
    return {"status": "success",
            "final_loss": float(losses[-1] if losses else meta["last_train_loss"]),
            "epochs": epochs,
            "metadata": {"num_examples": int(meta.get("train_examples", meta["examples"])),
                         "num_epochs_trained": epochs,
                         "training_time_seconds": float(meta.get("training_seconds",
                                                                 meta.get("wall_seconds", 0.0))),
                         "early_stopped": bool(meta.get("early_stopped"))}}


def lora_summary(entries: dict[str, dict]) -> dict:
    statuses = [e["status"] for e in entries.values()]
    return {"completed": statuses.count("success"), "failed": statuses.count("failed"),
            "tasks": entries}


def _sft() -> JobType:
    """The job type a task runs as."""
    from tuneforge.jobs.registry import job_type  # the registry imports this module

    return job_type("sft")


class Atomic(JobType):
    name = "atomic"
    spec = AtomicSpec
    data_fields = ("eval_data",)
    has_tasks = True

    def parse_row(self, row: dict) -> dict:
        return data.sft_example(row)

    def preflight(self, spec) -> None:
        with blame("tasks"):
            data.load_tasks(spec.tasks)

    def named_files(self, spec) -> list[tuple[str, str]]:
        out = super().named_files(spec)
        if isinstance(spec.tasks, str):
            out.append(("tasks", spec.tasks))
        else:
            out += [(f"tasks[{i}].data", t.get("data")) for i, t in enumerate(spec.tasks)
                    if isinstance(t, dict) and isinstance(t.get("data"), str)]
        return out

    def listed_files(self, spec) -> list[tuple[str, str]]:
        if not isinstance(spec.tasks, str):
            return []
        return [(f"task {t['name']}: data", t["data"]) for t in data.load_tasks(spec.tasks)
                if isinstance(t["data"], str)]

    def resolve_paths(self, spec, base_dir: Path):
        spec = super().resolve_paths(spec, base_dir)
        return spec.model_copy(update={"tasks": resolve_path(spec.tasks, base_dir)})

    def inline(self, spec):
        spec = super().inline(spec)
        tasks = [{**t, "data": data.plain_rows(data.read_rows(t["data"], f"task {t['name']}"))
                  if isinstance(t["data"], str) else t["data"]}
                 for t in data.load_tasks(spec.tasks)]
        return spec.model_copy(update={"tasks": tasks})

    def run(self, ctx: JobContext) -> dict:
        return run(ctx)

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        """Every task's rows, task after task, each cut at its own max_length."""
        rows, total = [], 0
        for task in data.load_tasks(spec.tasks):
            try:
                tspec = task_spec(spec, task)
            except UserError:
                raise
            except ValueError as e:  # an option a task may not set
                raise UserError(f"tasks: {e}") from None
            examples = self.examples(tspec.data, f"task {task['name']}")
            total += len(examples)
            for ex in examples[:max(0, limit - len(rows))]:
                tokens, weights, _ = preview_chat(renderer, ex["messages"], spec.train_on)
                rows.append((tokens, weights, {"task": task["name"],
                                               "max_length": tspec.max_length}))
        return rows, total
