"""Atomic batches: one small SFT adapter per task, trained concurrently on the shared base model.

Each task gets its own folder under `tasks/NAME/` (config, log, metrics, checkpoints,
`training_history.json`, `metadata.json`, the adapter) and runs the same supervised loop as an
`sft` job, with early stopping when the job sets `patience`. A task that fails records its
traceback in its metadata; the others go on. `summary.json` lists every task. A resumed batch
skips tasks that already finished and continues the others from their checkpoints.
"""

from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from tuneforge.jobs import data
from tuneforge.jobs.runner import Cancelled, JobContext, Progress, RunDir
from tuneforge.jobs.spec import TASK_OVERRIDES, SFTSpec, parse_spec, spec_to_dict

DONE = ("completed", "failed")


def task_spec(parent, task: dict) -> SFTSpec:
    unknown = set(task) - {"name", "data", *TASK_OVERRIDES}
    if unknown:
        raise ValueError(f"task {task['name']!r}: unknown option(s) {', '.join(sorted(unknown))}"
                         f" (a task may set: {', '.join(TASK_OVERRIDES)})")
    base = spec_to_dict(parent)
    for key in ("type", "tasks", "max_concurrent"):
        base.pop(key, None)
    raw = {**base, **{k: v for k, v in task.items() if k in TASK_OVERRIDES}, "type": "sft",
           "name": task["name"], "data": task["data"]}
    return parse_spec(raw)


def run(ctx: JobContext) -> dict:
    from tuneforge.jobs import sft

    spec = ctx.spec
    tasks = data.load_tasks(spec.tasks)
    root = ctx.run.path / "tasks"
    progress = {t["name"]: Progress() for t in tasks}
    finished: set[str] = set()
    lock = threading.Lock()
    started = time.monotonic()
    ctx.run.log(f"atomic batch of {len(tasks)} tasks, {spec.max_concurrent} at a time")

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
            import json

            meta = json.loads(meta_path.read_text())
            if meta.get("status") in DONE:
                with lock:
                    finished.add(name)
                return meta
        t0 = time.monotonic()
        meta = {"name": name, "status": "running"}
        child = None
        try:
            tspec = task_spec(spec, task)
            child = ctx.child(tspec, folder.path, progress[name])
            child.on_progress = lambda _snap: report()
            child.run.write_config(tspec)
            train, held_out = sft.load_split(tspec, "sft")
            out = sft.train_supervised(child, sft.Supervised(child, train, held_out,
                                                             spec.train_on), tag=f"[{name}] ")
            meta.update(status="completed", examples=out["examples"],
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
        with lock:
            finished.add(name)
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
    ctx.run.log(f"atomic batch done: {summary['completed']} completed, {summary['failed']} "
                f"failed, {summary['early_stopped']} stopped early")
    return {k: v for k, v in summary.items() if k != "results"}
