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
import shutil
import tempfile
from pathlib import Path

from common import REPO, median, record, start_server, timed
from step_overhead import engine_busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    from tuneforge.jobs.data import read_rows
    from tuneforge.jobs.runner import JobContext, RunDir, run_job
    from tuneforge.jobs.spec import parse_spec

    files = sorted((REPO / "examples" / "tasks").glob("*.jsonl"))
    tasks = [{"name": f"{f.stem}-{c}",
              "data": [{k: v for k, v in r.items() if k != "_where"} for r in read_rows(str(f))]}
             for c in range(args.copies) for f in files]
    base = {"type": "atomic", "base_model": args.model, "tasks": tasks, "lora_rank": 8,
            "learning_rate": 5e-3, "batch_size": 3, "epochs": 4, "eval_split": 0.25,
            "eval_samples": 0}
    times: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    busy: dict[str, list[float]] = {"concurrent": [], "sequential": []}
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
                    busy_share = (engine_busy(server) - busy_before) / t
                    ctx.close("success")
                    summary = json.loads((out / "summary.json").read_text())
                    assert summary["completed"] == len(tasks), summary
                    losses[name] = sum(x["last_train_loss"] for x in summary["results"]) / len(
                        tasks)
                    if r:
                        times[name].append(t)
                        busy[name].append(busy_share)
                    shutil.rmtree(out)
        finally:
            server.stop()
    conc, seq = median(times["concurrent"]), median(times["sequential"])
    print(f"model {args.model}, atomic batch of {len(tasks)} SFT tasks (8 rows each, 4 epochs, "
          f"rank 8), {args.threads} server thread(s)")
    for name in times:
        print(f"  {name:10s} {median(times[name]):7.2f} s   mean last train loss "
              f"{losses[name]:.3f}   engine busy {100 * median(busy[name]):.0f}% of the time")
    print(f"sequential / concurrent = {seq / conc:.2f}   (wall-time speed-up of training the "
          "tasks at once)")
    if args.record:
        record("atomic", f"{args.model} | {len(tasks)} tasks, {args.threads} thr | "
               f"{conc:.1f} / {seq:.1f} s | {seq / conc:.2f} | "
               f"{losses['concurrent']:.3f} / {losses['sequential']:.3f}")


if __name__ == "__main__":
    main()
