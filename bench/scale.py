"""Engine workers in Ray actors: what two CPU workers buy over one in-process engine.

Three comparisons, each against an in-process server with the same number of torch threads in
all, through the SDK; the servers run one after another (never two at once):
  tenants        eight tenants (one adapter and one SDK training client each, distinct seeds)
                 train at the same time, each in its own thread: forward_backward + optim_step
                 steps of a few datums. Ray server: `--ray auto`, 2 workers of 1 thread each
                 (the tenants placed 4 + 4); in-process: one engine of 2 threads, its passes
                 shared across adapters. Ratio: aggregate training tokens/s (goal >= 1.4).
  data parallel  one client, 16 datums per step. Ray server: 2 workers of 1 thread in one
                 data-parallel group for the model (8 datums each, gradients all-reduced);
                 in-process: one engine of 2 threads. Ratio: steps/s (goal >= 1.2).
  latency        one client, sequential: the same small forward (1 datum of 8 tokens), and an
                 optim_step, repeated. Ray server: 1 worker of 1 thread; in-process: the same
                 engine (1 thread) in the server's process. Added latency: median minus median
                 (goal <= 5 ms for the forward). Also the server-side part of it: the time the
                 worker's scheduler thread spends per request (worker_busy_seconds_total).
The in-process server of 1 thread also runs the two throughput phases: against it,
ray / (2 x 1 thread) says how much of perfect two-core scaling the workers reach, and in-process
2 threads / 1 thread how much torch's own threads reach (ray / in-process is their quotient).
Throughputs are medians over the rounds after a warm-up round. Beside each throughput phase
the script prints where the CPU time went (the controller process, each worker process, Ray's
own daemons, this client process, as cores used over the wall time) and each worker's busy
share (`tuneforge_worker_busy_seconds_total` over the wall time) and the passes run per round.

    python bench/scale.py [--model tuneforge/tiny-qwen3-l] [--tenants 8] [--datums 2]
                          [--seq 128] [--dp-batch 16] [--rounds 5] [--steps 4] [--reps 200]
                          [--threads 2] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from common import median, random_datums, record, run_all, start_server, timed, train_step

RANK = 16


@contextlib.contextmanager
def serving(tmp: Path, name: str, model: str, threads: int, **env: str):
    """A server (and an SDK service client on it) for the length of the block."""
    import tinker

    t0 = time.perf_counter()
    server = start_server(tmp / name, model, threads, **env)
    print(f"[{name}] up in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as sc:
            yield server, sc
    finally:
        server.stop()


def system(server) -> dict:
    return httpx.get(f"{server.base_url}/api/system", headers={"X-API-Key": server.api_key},
                     timeout=30).json()


def engine_worker(server, model_id: str) -> str | None:
    return httpx.get(f"{server.base_url}/api/v1/training_runs/{model_id}",
                     headers={"X-API-Key": server.api_key}, timeout=30).json()["engine_worker"]


def per_worker(metrics: dict[str, float], name: str) -> dict[str, float]:
    """worker name -> the value of the per-worker metric `name`."""
    prefix = f'{name}{{worker="'
    return {k[len(prefix):-2]: v for k, v in metrics.items() if k.startswith(prefix)}


def worker_busy(server) -> dict[str, float]:
    return per_worker(server.metrics(), "tuneforge_worker_busy_seconds_total")


class CpuMeter:
    """CPU seconds (user + system) of the processes a server run consists of, by role."""

    def __init__(self, server) -> None:
        controller = psutil.Process(server.proc.pid)
        workers = {w["pid"]: w["name"] for w in system(server)["workers"] if w.get("pid")}
        self.roles: dict[str, list[psutil.Process]] = {"controller": [controller],
                                                       "client": [psutil.Process()]}
        for name in workers.values():
            self.roles[name] = []
        self.roles["ray daemons"] = []
        for child in controller.children(recursive=True):
            role = workers.get(child.pid, "ray daemons")
            self.roles[role].append(child)
        if not self.roles["ray daemons"]:
            del self.roles["ray daemons"]

    def read(self) -> dict[str, float]:
        out = {}
        for role, procs in self.roles.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:  # a short-lived Ray process that exited
                    pass
            out[role] = total
        return out


class Phase:
    """Wall time, CPU by role and worker busy time of repeated runs of one loop."""

    def __init__(self, server) -> None:
        self.server, self.cpu = server, CpuMeter(server)
        self.times: list[float] = []
        self.cores: dict[str, list[float]] = {}
        self.busy: dict[str, list[float]] = {}
        self.passes: list[float] = []

    def _read(self) -> tuple[dict[str, float], dict[str, float], float]:
        metrics = self.server.metrics()
        return (self.cpu.read(), per_worker(metrics, "tuneforge_worker_busy_seconds_total"),
                sum(per_worker(metrics, "tuneforge_worker_passes_total").values()))

    def run(self, fn, rounds: int) -> None:
        for r in range(rounds + 1):  # the first round warms up
            cpu0, busy0, passes0 = self._read()
            t = timed(fn)
            cpu1, busy1, passes1 = self._read()
            if not r:
                continue
            self.times.append(t)
            self.passes.append(passes1 - passes0)
            for role in cpu1:
                self.cores.setdefault(role, []).append((cpu1[role] - cpu0[role]) / t)
            for name in busy1:
                self.busy.setdefault(name, []).append((busy1[name] - busy0.get(name, 0.0)) / t)

    def describe(self) -> str:
        cores = ", ".join(f"{role} {median(v):.2f}" for role, v in self.cores.items())
        busy = ", ".join(f"{name} {100 * median(v):.0f}%" for name, v in self.busy.items()
                         if median(v) > 0)
        total = sum(median(v) for v in self.cores.values())
        return (f"cores used: {cores} (sum {total:.2f}); worker busy: {busy}; "
                f"{median(self.passes):.0f} passes per round")


def tenants(server, sc, args, datum, adam) -> Phase:
    clients = [sc.create_lora_training_client(base_model=args.model, rank=RANK, seed=i).result()
               for i in range(args.tenants)]
    placed = [engine_worker(server, tc.model_id) for tc in clients]
    print(f"  tenants on: {', '.join(f'{w} x{placed.count(w)}' for w in sorted(set(placed)))}")
    data = [[datum() for _ in range(args.datums)] for _ in clients]

    def concurrent():
        run_all([lambda tc=tc, d=d: [train_step(tc, d, adam) for _ in range(args.steps)]
                 for tc, d in zip(clients, data, strict=True)])

    phase = Phase(server)
    phase.run(concurrent, args.rounds)
    print(f"  tenants: {median(phase.times):.2f} s per round; {phase.describe()}", flush=True)
    return phase


def one_batch(server, sc, args, datum, adam) -> Phase:
    tc = sc.create_lora_training_client(base_model=args.model, rank=RANK, seed=100).result()
    print(f"  batch run on: {engine_worker(server, tc.model_id)}")
    batch = [datum() for _ in range(args.dp_batch)]
    phase = Phase(server)
    phase.run(lambda: [train_step(tc, batch, adam) for _ in range(args.steps)], args.rounds)
    print(f"  batch: {median(phase.times) / args.steps:.3f} s per step; {phase.describe()}",
          flush=True)
    return phase


def latency(server, sc, args, adam) -> dict[str, float]:
    """Median seconds per sequential request (forward, optim_step), and server-side seconds
    per request on the worker's scheduler thread."""
    import numpy as np
    from tinker import types

    tc = sc.create_lora_training_client(base_model=args.model, rank=1, seed=200).result()
    tokens = np.arange(1, 10)
    small = [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": tokens[1:]})]
    out = {}
    for name, call in (("forward", lambda: tc.forward(small, "cross_entropy").result()),
                       ("optim_step", lambda: tc.optim_step(adam).result())):
        for _ in range(max(10, args.reps // 10)):  # warm-up
            call()
        busy0 = sum(worker_busy(server).values())
        times = [timed(call) for _ in range(args.reps)]
        out[name] = median(times)
        out[f"{name} busy"] = (sum(worker_busy(server).values()) - busy0) / args.reps
    print("  latency: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3-l")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--datums", type=int, default=2, help="datums per tenant step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per datum")
    ap.add_argument("--dp-batch", type=int, default=16, help="datums per data-parallel step")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of each phase")
    ap.add_argument("--steps", type=int, default=4, help="steps per client per round")
    ap.add_argument("--reps", type=int, default=200, help="requests per latency measurement")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of the in-process engine = Ray workers x their threads")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.threads < 2:
        ap.error("--threads: at least 2 (a data-parallel group needs two workers)")
    import torch
    from tinker import types

    torch.set_num_threads(1)  # the SDK imports torch; keep this process off the server's cores
    datum = random_datums(args.model, args.seq)
    adam = types.AdamParams(learning_rate=1e-4)
    k = args.threads  # Ray workers of 1 thread each for the throughput comparisons
    ray_env = {"TUNEFORGE_RAY": "auto", "TUNEFORGE_WORKER_THREADS": "1"}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with serving(tmp, "in-process", args.model, args.threads) as (server, sc):
            local_tenants = tenants(server, sc, args, datum, adam)
            local_batch = one_batch(server, sc, args, datum, adam)
        with serving(tmp, "in-process 1 thr", args.model, 1) as (server, sc):
            one_tenants = tenants(server, sc, args, datum, adam)
            one_batch_1 = one_batch(server, sc, args, datum, adam)
            local_latency = latency(server, sc, args, adam)
        with serving(tmp, f"ray {k} workers", args.model, 1, **ray_env,
                     TUNEFORGE_WORKERS=str(k)) as (server, sc):
            ray_tenants = tenants(server, sc, args, datum, adam)
        with serving(tmp, f"ray data-parallel x{k}", args.model, 1, **ray_env,
                     TUNEFORGE_WORKERS=str(k),
                     TUNEFORGE_DATA_PARALLEL=f'{{"{args.model}": {k}}}') as (server, sc):
            dp_batch = one_batch(server, sc, args, datum, adam)
        with serving(tmp, "ray 1 worker", args.model, 1, **ray_env,
                     TUNEFORGE_WORKERS="1") as (server, sc):
            ray_latency = latency(server, sc, args, adam)

    tenant_tokens = args.tenants * args.datums * args.seq * args.steps
    tps = {name: tenant_tokens / median(p.times) for name, p in
           (("ray", ray_tenants), ("in-process", local_tenants), ("1 thr", one_tenants))}
    sps = {name: args.steps / median(p.times) for name, p in
           (("dp", dp_batch), ("one", local_batch), ("1 thr", one_batch_1))}
    # against perfect scaling of a 1-thread engine over `k` cores, and torch's own threading
    scaling = {"tenants ray": tps["ray"] / (k * tps["1 thr"]),
               "tenants threads": tps["in-process"] / tps["1 thr"],
               "dp ray": sps["dp"] / (k * sps["1 thr"]),
               "dp threads": sps["one"] / sps["1 thr"]}
    added = {name: ray_latency[name] - local_latency[name] for name in ("forward", "optim_step")}
    added_busy = {name: ray_latency[f"{name} busy"] - local_latency[f"{name} busy"]
                  for name in ("forward", "optim_step")}
    r_tenants, r_dp = tps["ray"] / tps["in-process"], sps["dp"] / sps["one"]

    print(f"\nmodel {args.model}, {args.threads} threads in all, {args.rounds} rounds x "
          f"{args.steps} steps after a warm-up round, {time.perf_counter() - t_start:.0f} s")
    print(f"tenants: {args.tenants} x {args.datums}x{args.seq} tokens per step, rank {RANK}")
    print(f"  ray {k} workers x 1 thr   {tps['ray']:8.0f} tokens/s   "
          f"{ray_tenants.describe()}")
    print(f"  in-process {args.threads} thr       {tps['in-process']:8.0f} tokens/s   "
          f"{local_tenants.describe()}")
    print(f"  in-process 1 thr       {tps['1 thr']:8.0f} tokens/s   {one_tenants.describe()}")
    print(f"  ray / ({k} x 1 thr) = {scaling['tenants ray']:.2f}, in-process {args.threads} thr "
          f"/ 1 thr = {scaling['tenants threads']:.2f}")
    print(f"data parallel: {args.dp_batch}x{args.seq} tokens per step, rank {RANK}")
    print(f"  ray dp x{k} x 1 thr       {sps['dp']:8.2f} steps/s    {dp_batch.describe()}")
    print(f"  in-process {args.threads} thr       {sps['one']:8.2f} steps/s    "
          f"{local_batch.describe()}")
    print(f"  in-process 1 thr       {sps['1 thr']:8.2f} steps/s    {one_batch_1.describe()}")
    print(f"  dp / ({k} x 1 thr) = {scaling['dp ray']:.2f}, in-process {args.threads} thr / 1 thr "
          f"= {scaling['dp threads']:.2f}")
    print(f"latency, 1 thread (median of {args.reps} sequential requests; server-side: the "
          "worker's scheduler thread per request)")
    for name in ("forward", "optim_step"):
        print(f"  {name:10s} ray 1 worker {1e3 * ray_latency[name]:6.2f} ms, in-process "
              f"{1e3 * local_latency[name]:6.2f} ms, added {1e3 * added[name]:+6.2f} ms "
              f"(server-side {1e3 * ray_latency[f'{name} busy']:.2f} vs "
              f"{1e3 * local_latency[f'{name} busy']:.2f} ms, {1e3 * added_busy[name]:+.2f})")
    print(f"tenants ray / in-process       = {r_tenants:.2f}   (goal >= 1.4)")
    print(f"data parallel dp / one         = {r_dp:.2f}   (goal >= 1.2)")
    print(f"added latency (1x8 forward)    = {1e3 * added['forward']:+.2f} ms   (goal <= 5 ms)")
    if args.record:
        record("scale", f"{args.model} | {args.tenants} x {args.datums}x{args.seq}; "
               f"dp {args.dp_batch}x{args.seq}; {args.threads} thr, latency 1 thr, "
               f"{args.rounds}x{args.steps} steps | {tps['ray']:.0f} / {tps['in-process']:.0f} | "
               f"{r_tenants:.2f} | "
               f"{sps['dp']:.2f} / {sps['one']:.2f} | {r_dp:.2f} | "
               f"{scaling['tenants ray']:.2f} / {scaling['tenants threads']:.2f}; "
               f"{scaling['dp ray']:.2f} / {scaling['dp threads']:.2f} | "
               f"{1e3 * ray_latency['forward']:.1f} / {1e3 * local_latency['forward']:.1f} ms | "
               f"{1e3 * added['forward']:+.1f} ms (server-side {1e3 * added_busy['forward']:+.1f})"
               f"; optim_step {1e3 * added['optim_step']:+.1f} ms")


if __name__ == "__main__":
    main()
