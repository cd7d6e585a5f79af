"""Many tenants, one base model: cross-adapter batching through the SDK.

Eight clients (distinct adapters, ranks and target sets) each run one-sequence
forward_backward + optim_step steps. Measured side by side on one server, in phases that repeat:
  concurrent  every client trains at the same time, each in its own thread at its own pace
              (the scheduler merges what is queued into shared passes)
  sequential  the same clients and steps, one client after another (no sharing possible)
  single      one adapter whose requests hold all the clients' sequences (one big batch)
Prints aggregate training tokens/s and the ratios concurrent/sequential (goal >= 1.5) and
concurrent/single (goal >= 0.85): medians over the repeats, after a warm-up phase of each.

    python bench/multi_tenant.py [--model tuneforge/tiny-qwen3-l] [--clients 8] [--seq 128]
                                 [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (
    engine_busy,
    median,
    random_datums,
    record,
    run_all,
    start_server,
    timed,
    train_step,
)

RANKS = [8, 16, 4, 32, 8, 2, 64, 16]
TARGETS = [dict(), dict(train_mlp=False), dict(train_attn=False), dict(train_unembed=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3-l")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the three phases")
    ap.add_argument("--steps", type=int, default=6, help="steps per client per phase")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-wait-ms", type=float, default=None,
                    help="server setting TUNEFORGE_BATCH_WAIT_MS (default: the server's)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import tinker
    from tinker import types

    datum = random_datums(args.model, args.seq)

    adam = types.AdamParams(learning_rate=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        env = {} if args.batch_wait_ms is None else {"TUNEFORGE_BATCH_WAIT_MS":
                                                     str(args.batch_wait_ms)}
        server = start_server(Path(tmp), args.model, args.threads, **env)
        try:
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            clients = [sc.create_lora_training_client(base_model=args.model,
                                                      rank=RANKS[i % len(RANKS)], seed=i,
                                                      **TARGETS[i % len(TARGETS)]).result()
                       for i in range(args.clients)]
            one = sc.create_lora_training_client(base_model=args.model, rank=16).result()
            data = [[datum()] for _ in clients]
            everything = [d[0] for d in data]

            def concurrent():
                run_all([lambda tc=tc, d=d: [train_step(tc, d, adam) for _ in range(args.steps)]
                         for tc, d in zip(clients, data, strict=True)])

            def sequential():
                for tc, d in zip(clients, data, strict=True):
                    for _ in range(args.steps):
                        train_step(tc, d, adam)

            def single():
                for _ in range(args.steps):
                    train_step(one, everything, adam)

            loops = {"concurrent": concurrent, "sequential": sequential, "single": single}
            times = {name: [] for name in loops}
            passes, busy = [], []
            for r in range(args.rounds + 1):
                for name, fn in loops.items():
                    before = server.metrics()["tuneforge_training_passes_total"]
                    busy_before = engine_busy(server)
                    t = timed(fn)
                    if name == "concurrent" and r:
                        busy.append((engine_busy(server) - busy_before) / t)
                        passes.append(server.metrics()["tuneforge_training_passes_total"] - before)
                    if r:  # the first phase of each warms up
                        times[name].append(t)
        finally:
            server.stop()
    tokens = args.clients * args.seq * args.steps
    tps = {name: tokens / median(ts) for name, ts in times.items()}
    print(f"model {args.model}, {args.clients} clients x 1 sequence of {args.seq} tokens per "
          f"step, {args.steps} steps per phase, ranks {RANKS[:args.clients]}, "
          f"{args.threads} server thread(s), {args.rounds} repeats")
    for name in loops:
        print(f"  {name:10s} {median(times[name]):8.2f} s per phase   "
              f"{tps[name]:8.0f} tokens/s")
    vs_seq, vs_single = tps["concurrent"] / tps["sequential"], tps["concurrent"] / tps["single"]
    print(f"  concurrent phases ran {args.clients * args.steps} forward_backward requests in "
          f"{median(passes):.0f} shared passes (median), the engine busy "
          f"{100 * median(busy):.0f}% of the time")
    print(f"concurrent / sequential = {vs_seq:.2f}   (goal >= 1.5)")
    print(f"concurrent / single     = {vs_single:.2f}   (goal >= 0.85)")
    if args.record:
        record("multi_tenant", f"{args.model} | {args.clients} clients x 1x{args.seq} tokens, "
               f"{args.steps} steps, {args.threads} thr | "
               f"{tps['concurrent']:.0f} / {tps['sequential']:.0f} / {tps['single']:.0f} | "
               f"{vs_seq:.2f} | {vs_single:.2f}")


if __name__ == "__main__":
    main()
