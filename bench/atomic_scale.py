"""Atomic batches at scale: 40 small tasks, then 400, through the REST job API of a real server.

Each task is its own small SFT adapter (`--rows` rows, 1 epoch, rank 4, the tiny model) and its
own SDK session. After a warm-up batch (which loads what every batch uses), a batch of `--small`
tasks and one of `--large` tasks run one after the other, as a user submits them
(`POST /api/jobs`). Prints each batch's wall time and the ratio large / small (linear growth:
about large / small), what the server process holds before and after each batch and `--settle`
seconds later (open files, threads, resident memory), the peak adapter memory against the
budget (`/api/system`), and checks that the atomic-LoRA summary lists every task.

    python bench/atomic_scale.py [--model tuneforge/tiny-qwen3] [--small 40] [--large 400]
                                 [--rows 4] [--max-concurrent 8] [--threads 1] [--settle 10]
                                 [--record]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import record, start_server


def held(pid: int) -> dict:
    """Open files (and how many of them are sockets), threads and resident memory (MB) of
    process `pid`."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    fds = [str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir() if p.is_symlink()]
    return {"fds": len(fds), "sockets": sum(f.startswith("socket:") for f in fds),
            "threads": int(status["Threads"]), "rss_mb": int(status["VmRSS"].split()[0]) // 1024}


def spec(n: int, prefix: str, rows: int, width: int) -> dict:
    tasks = [{"name": f"{prefix}{i:04d}",
              "data": [{"prompt": f"word{i} {j}", "response": f"WORD{i} {j}"}
                       for j in range(rows)]} for i in range(n)]
    return {"type": "atomic", "base_model": "tuneforge/tiny-qwen3", "tasks": tasks,
            "max_concurrent": width, "lora_rank": 4, "batch_size": rows, "epochs": 1,
            "max_length": 32, "eval_samples": 0}


def run_batch(server, api: httpx.Client, body: dict) -> tuple[float, dict, dict]:
    """Wall seconds, the job and the peak adapter memory seen while it ran."""
    peak = {"memory_bytes": 0, "resident": 0, "memory_limit_bytes": 0}
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=server.base_url, headers=api.headers, timeout=30) as c:
            while not done.is_set():
                adapters = c.get("/api/system").json()["adapters"]
                peak["memory_bytes"] = max(peak["memory_bytes"], adapters["memory_bytes"])
                peak["resident"] = max(peak["resident"], adapters["resident"])
                peak["memory_limit_bytes"] = adapters["memory_limit_bytes"]
                done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.perf_counter()
    job_id = api.post("/api/jobs", json=body).raise_for_status().json()["id"]
    watcher.start()
    while (job := api.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if job["status"] != "completed":
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    summary = json.loads((Path(job["folder"]) / "atomic_lora_training_summary.json").read_text())
    names = [t["name"] for t in body["tasks"]]
    assert list(summary["tasks"]) == names and summary["completed"] == len(names), summary
    return wall, job, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3")
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--large", type=int, default=400)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--max-concurrent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "server", args.model, args.threads)
        pid = server.proc.pid
        try:
            api = httpx.Client(base_url=server.base_url, timeout=60,
                               headers={"X-API-Key": server.api_key})
            rows.append(("fresh server", None, held(pid), None))
            walls = {}
            for name, n in (("warm-up", 8), ("small", args.small), ("large", args.large)):
                body = spec(n, name[0], args.rows, args.max_concurrent)
                wall, _job, peak = run_batch(server, api, body)
                walls[name] = wall
                rows.append((f"after {n} tasks ({name})", wall, held(pid), peak))
                time.sleep(args.settle)
                rows.append((f"  {args.settle:g} s later", None, held(pid), None))
        finally:
            server.stop()
    ratio = walls["large"] / walls["small"]
    print(f"model {args.model}: atomic batches of {args.rows}-row tasks, 1 epoch, rank 4, "
          f"{args.max_concurrent} at a time, {args.threads} server thread(s), via POST /api/jobs")
    print(f"{'':28s} {'wall s':>8s} {'open files (sockets)':>20s} {'threads':>8s} "
          f"{'RSS MB':>7s}   adapter memory peak (budget)")
    for label, wall, h, peak in rows:
        mem = "" if peak is None else (f"{peak['memory_bytes'] / 2**20:.1f} MB in "
                                       f"{peak['resident']} adapters "
                                       f"({peak['memory_limit_bytes'] / 2**20:.0f} MB)")
        files = f"{h['fds']} ({h['sockets']})"
        print(f"{label:28s} {'' if wall is None else f'{wall:8.1f}':>8s} {files:>20s} "
              f"{h['threads']:8d} {h['rss_mb']:7d}   {mem}")
    print(f"{args.large} / {args.small} tasks: time x {ratio:.2f} (linear: "
          f"x {args.large / args.small:g}); per task {walls['small'] / args.small:.2f} s / "
          f"{walls['large'] / args.large:.2f} s")
    if args.record:
        settled = [h for label, _, h, _ in rows if label.strip().endswith("later")]
        record("atomic_scale", f"{args.model} | {args.small} / {args.large} tasks, "
               f"{args.threads} thr | {walls['small']:.1f} / {walls['large']:.1f} s | "
               f"{ratio:.2f} | {rows[0][2]['fds']} → {settled[1]['fds']} → "
               f"{settled[2]['fds']} files, {rows[0][2]['rss_mb']} → {settled[1]['rss_mb']} → "
               f"{settled[2]['rss_mb']} MB")


if __name__ == "__main__":
    main()
