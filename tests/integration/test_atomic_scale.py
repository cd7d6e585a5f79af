"""An atomic batch of 40 small tasks through the REST job API on a real server: the atomic-LoRA
summary lists every task with its exact fields and types, a task with a bad row fails alone with
its traceback, `learning_rate_scale` gives exactly that multiple of the get_lr formula's rate,
and the server holds no more open files or threads after the batch than before it.
(bench/atomic_scale.py runs 400 such tasks and measures time and memory.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
TASKS = 40
# What the server may hold after a batch beyond what it held after a warm-up one: database
# connections (SQLAlchemy keeps up to 5, two files each), idle request threads (the pool keeps
# what the busiest moment needed) and a few connections (measured: 1 to 6 more files, 4 more
# threads at most). Before each task's REST client ran over its own session's connections and
# job clients stopped sending telemetry, the server kept one open connection per task (the
# SDK's cache of 100 closed sessions; 39 more files after this batch) and a few per job.
MORE_FDS = 14
MORE_THREADS = 8


def rows(i: int) -> list[dict]:
    return [{"prompt": f"word{i} {j}", "response": f"WORD{i} {j}"} for j in range(4)]


def batch(n: int, prefix: str, **changes) -> dict:
    return {"type": "atomic", "base_model": MODEL, "max_concurrent": 8, "lora_rank": 4,
            "batch_size": 4, "epochs": 1, "eval_samples": 0, "max_length": 32,
            "tasks": [{"name": f"{prefix}{i:03d}", "data": rows(i)} for i in range(n)],
            **changes}


def run_job(server: ServerProcess, spec: dict, timeout: float = 600) -> dict:
    with httpx.Client(base_url=f"{server.base_url}/api/jobs",
                      headers={"X-API-Key": server.api_key}, timeout=60) as api:
        answer = api.post("", json=spec)
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = api.get(f"/{answer.json()['id']}").json()
            if job["status"] not in ("queued", "running"):
                assert job["status"] == "completed", (job["error"], server.log())
                return job
            time.sleep(0.5)
    raise TimeoutError(f"job {answer.json()['id']} did not finish")


def held(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of process `pid`."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("Threads:")))
    return fds, threads


def settled(pid: int, fds: int, threads: int, within: float = 30.0) -> tuple[int, int]:
    """What `pid` holds once it is back within the bounds (idle keep-alive connections close
    after a few seconds), or after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        now = held(pid)
        if (now[0] <= fds + MORE_FDS and now[1] <= threads + MORE_THREADS
                or time.monotonic() > deadline):
            return now
        time.sleep(0.5)


@pytest.fixture(scope="module")
def scale_server(tmp_path_factory, models_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("atomic-scale"), models_dir).start()
    yield proc
    proc.stop()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/PID/fd")
def test_a_40_task_batch_summarises_every_task_and_leaves_nothing_open(scale_server):
    pid = scale_server.proc.pid
    run_job(scale_server, batch(8, "warm"))  # the first batch loads what every batch uses
    fds0, threads0 = settled(pid, 10**6, 10**6)

    spec = batch(TASKS - 1, "t", learning_rate_scale=0.1)
    spec["tasks"][0]["learning_rate_scale"] = 1.0  # a task sets its own
    spec["tasks"].append({"name": "broken", "data": [{"prompt": "a", "response": "b"},
                                                     {"prompt": "no response here"}]})
    job = run_job(scale_server, spec)
    fds1, threads1 = settled(pid, fds0, threads0)
    print(f"\nserver after the warm-up batch: {fds0} open files, {threads0} threads; after "
          f"{TASKS} more tasks: {fds1} open files, {threads1} threads")

    out = Path(job["folder"])
    summary = json.loads((out / "atomic_lora_training_summary.json").read_text())
    assert (out / "summary.json").exists()
    assert set(summary) == {"completed", "failed", "tasks"}
    assert list(summary["tasks"]) == [t["name"] for t in spec["tasks"]]
    assert (summary["completed"], summary["failed"]) == (TASKS - 1, 1)
    broken = summary["tasks"].pop("broken")
    assert set(broken) == {"status", "error", "traceback"} and broken["status"] == "failed"
    assert broken["traceback"].startswith("Traceback") and "data[1]" in broken["error"]
    for name, task in summary["tasks"].items():
        assert set(task) == {"status", "final_loss", "epochs", "metadata"}
        assert task["status"] == "success"
        assert type(task["final_loss"]) is float and task["final_loss"] > 0
        assert type(task["epochs"]) is int and task["epochs"] == 1
        meta = task["metadata"]
        assert set(meta) == {"num_examples", "num_epochs_trained", "training_time_seconds",
                             "early_stopped"}
        assert [type(meta[k]) for k in ("num_examples", "num_epochs_trained",
                                        "training_time_seconds", "early_stopped")] == [
            int, int, float, bool]
        assert (meta["num_examples"], meta["num_epochs_trained"]) == (4, 1)
        assert meta["training_time_seconds"] > 0 and meta["early_stopped"] is False
        history = json.loads((out / "tasks" / name / "training_history.json").read_text())
        assert [h["epoch"] for h in history] == [1]
        assert history[0]["loss"] == history[0]["train_loss"] == task["final_loss"]

    # learning_rate_scale: exactly that multiple of the formula's value, logged as such
    metas = {name: json.loads((out / "tasks" / name / "metadata.json").read_text())
             for name in ("t000", "t001")}
    formula = metas["t000"]["learning_rate"]
    assert metas["t001"]["learning_rate"] == 0.1 * formula
    assert "(0.1 x the get_lr formula)" in (out / "tasks" / "t001" / "log.txt").read_text()
    assert "learning_rate_scale: 0.1" in (out / "tasks" / "t001" / "config.yaml").read_text()

    assert fds1 <= fds0 + MORE_FDS, (fds0, fds1)
    assert threads1 <= threads0 + MORE_THREADS, (threads0, threads1)
    system = httpx.get(f"{scale_server.base_url}/api/system",
                       headers={"X-API-Key": scale_server.api_key}, timeout=30).json()
    assert system["adapters"]["resident"] == 0 and system["adapters"]["samplers_resident"] == 0
