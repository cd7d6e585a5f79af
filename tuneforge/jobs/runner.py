"""Running a job: the checks before it starts and the dispatch to its type (jobs/registry.py).

The pieces a job is made of live in modules of their own: the experiment folder (rundir.py),
what a running job holds (context.py), facts about the base model (model.py), the shared
training loop (loop.py) and each job type's module.
"""

from __future__ import annotations

import time

from tuneforge.jobs.context import JobContext
from tuneforge.jobs.model import served_base
from tuneforge.jobs.registry import job_type


def preflight(spec) -> None:
    """Everything that can be checked before a job runs: data rows, grader, teacher context,
    the task list. Raises UserError naming the field (and file:line) at fault."""
    job_type(spec.type).preflight(spec)


def run_job(ctx: JobContext) -> dict:
    """Run (or continue) the job in `ctx` to the end; return its summary."""
    kind = ctx.spec.type
    started = time.monotonic()
    ctx.run.write_config(ctx.spec)
    named = f" {ctx.spec.name}" if ctx.spec.name else ""
    ctx.run.log(f"{kind} job{named} on {served_base(ctx.spec)} started")
    summary = job_type(kind).run(ctx)
    summary = {"type": kind, "name": ctx.spec.name, "base_model": ctx.spec.base_model,
               "quantization": ctx.spec.quantization,
               "wall_seconds": round(time.monotonic() - started, 2), **summary}
    ctx.run.write("result.json", summary)
    ctx.run.log(f"{kind} job finished")
    return summary
