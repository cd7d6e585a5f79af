"""Atomic batches: many small SFT adapters trained at once vs one after another.

The same atomic job (the five tasks of examples/tasks, each copied `--copies` times under new
names, each its own adapter) runs through a real server twice per round, interleaved:
  concurrent   max_concurrent = all tasks (their steps share passes over the base model)
  sequential   max_concurrent = 1
Prints the wall time of each (median over rounds) and sequential / concurrent, and checks that
both train the same way (mean last-epoch train loss of the tasks).

    python bench/atomic.py [--model tuneforge/tiny-qwen3] [--copies 2] [--rounds 2]
                           [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from common import REPO, engine_busy, median, record, start_server, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    from tuneforge.jobs.context import JobContext
    from tuneforge.jobs.data import plain_rows, read_rows
    from tuneforge.jobs.rundir import RunDir
    from tuneforge.jobs.runner import run_job
    from tuneforge.jobs.spec import parse_spec

    files = sorted((REPO / "examples" / "tasks").glob("*.jsonl"))
    tasks = [{"name": f"{f.stem}-{c}", "data": plain_rows(read_rows(str(f)))}
             for c in range(args.copies) for f in files]
    base = {"type": "atomic", "base_model": args.model, "tasks": tasks, "lora_rank": 8,
            "learning_rate": 5e-3, "batch_size": 3, "epochs": 4, "eval_split": 0.25,
            "eval_samples": 0}
    times: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    busy: dict[str, list[float]] = {"concurrent": [], "sequential": []}  # engine seconds
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "server", args.model, args.threads)
        try:
            for r in range(args.rounds + 1):  # the first round warms up
                for name, width in (("concurrent", len(tasks)), ("sequential", 1)):
                    spec = parse_spec({**base, "max_concurrent": width})
                    out = Path(tmp) / f"{name}-{r}"
                    ctx = JobContext.connect(spec, RunDir(out), server.base_url, server.api_key)
                    busy_before = engine_busy(server)
                    t = timed(lambda ctx=ctx: run_job(ctx))
                    busy_seconds = engine_busy(server) - busy_before
                    ctx.close("success")
                    summary = json.loads((out / "summary.json").read_text())
                    assert summary["completed"] == len(tasks), summary
                    losses[name] = sum(x["last_train_loss"] for x in summary["results"]) / len(
                        tasks)
                    if name == "sequential":  # the same training, whatever the concurrency
                        assert math.isclose(losses["concurrent"], losses["sequential"],
                                            rel_tol=1e-3), losses
                    if r:
                        times[name].append(t)
                        busy[name].append(busy_seconds)
                    shutil.rmtree(out)
        finally:
            server.stop()
    conc, seq = median(times["concurrent"]), median(times["sequential"])
    print(f"model {args.model}, atomic batch of {len(tasks)} SFT tasks (8 rows each, 4 epochs, "
          f"rank 8), {args.threads} server thread(s)")
    for name in times:
        print(f"  {name:10s} {median(times[name]):7.2f} s   mean last train loss "
              f"{losses[name]:.3f}   engine busy {median(busy[name]):.1f} s "
              f"({100 * median(busy[name]) / median(times[name]):.0f}%)")
    print(f"sequential / concurrent = {seq / conc:.2f}   (wall-time speed-up of training the "
          "tasks at once)")
    if args.record:
        record("atomic", f"{args.model} | {len(tasks)} tasks, {args.threads} thr | "
               f"{conc:.1f} / {seq:.1f} s | {seq / conc:.2f} | "
               f"{losses['concurrent']:.3f} / {losses['sequential']:.3f}")


if __name__ == "__main__":
    main()
