"""Many tenants in one engine: a shared pass of several adapters vs their passes one by one.

The engine called in this process (no HTTP, no scheduler), eight adapters (the ranks and target
sets of bench/multi_tenant.py) on one base model, each with one sequence per step. Measured side
by side in one run, interleaved so that machine noise hits both:
  together  one `forward_backward_batch` of the eight requests (one shared pass), then the
            eight `optim_step`s
  alone     for each adapter in turn: `forward_backward` then `optim_step`
Prints the median time of each (over --rounds) and the ratio alone / together, the part of the
cross-adapter speedup that the engine itself delivers (bench/multi_tenant.py measures it through
the SDK). `--profile` adds a torch.profiler table of one `together` step.

    python bench/tenants.py [--model tuneforge/tiny-qwen3] [--tenants 8] [--seq 96]
                            [--rounds 15] [--threads 1] [--dtype fp32|bf16] [--profile]
                            [--record]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import MODELS_DIR, record

RANKS = [8, 16, 4, 32, 8, 2, 64, 16]
TARGETS = [dict(), dict(train_mlp=False), dict(train_attn=False), dict(train_unembed=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="compute dtype (bf16: what --dtype auto picks on a CPU with AVX512-BF16)")
    ap.add_argument("--profile", action="store_true", help="print a profile of one shared step")
    ap.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tuneforge.engine.engine import Engine
    from tuneforge.engine.lora import LoRAConfig
    from tuneforge.engine.models import ModelRegistry
    from tuneforge.engine.optim import AdamParams
    from tuneforge.engine.types import Datum, ForwardBackwardInput
    from tuneforge.settings import Limits

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    engines = {side: Engine(ModelRegistry(Path(MODELS_DIR), torch.device("cpu"),
                                          dtype=args.dtype), Limits(), dtype=args.dtype)
               for side in ("together", "alone")}
    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    rng = np.random.default_rng(0)
    requests = []
    for i in range(args.tenants):
        config = LoRAConfig(rank=RANKS[i % len(RANKS)], alpha=32.0, seed=i,
                            **TARGETS[i % len(TARGETS)])
        for engine in engines.values():
            engine.create_model(f"t{i}", args.model, config)
        t = rng.integers(0, vocab, args.seq + 1)
        requests.append((f"t{i}", ForwardBackwardInput(
            data=[Datum(tokens=t[:-1], inputs={"target_tokens": t[1:]})],
            loss_fn="cross_entropy")))
    hp = AdamParams(learning_rate=1e-4)

    def together() -> None:
        engine = engines["together"]
        for outcome in engine.forward_backward_batch(requests):
            assert not isinstance(outcome, Exception), outcome
        for model_id, _ in requests:
            engine.optim_step(model_id, hp)

    def alone() -> None:
        engine = engines["alone"]
        for model_id, inp in requests:
            engine.forward_backward(model_id, inp)
            engine.optim_step(model_id, hp)

    sides = {"together": together, "alone": alone}
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"model {args.model}, {args.tenants} adapters (ranks {RANKS[:args.tenants]}) x 1 "
          f"sequence of {args.seq} tokens, forward_backward + optim_step, {args.threads} torch "
          f"thread(s), median of {args.rounds} rounds")
    for name in sides:
        print(f"  {name:8s} {med[name] * 1000:8.1f} ms per step of all adapters")
    ratio = med["alone"] / med["together"]
    print(f"alone / together = {ratio:.2f}   (engine level; the SDK goal is >= 1.5)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            together()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if args.record:
        record("tenants", f"{args.model} | {args.tenants} adapters x 1x{args.seq} tokens, "
               f"{args.dtype}, {args.threads} thr, {args.rounds} rounds | "
               f"{med['together'] * 1000:.1f} / {med['alone'] * 1000:.1f} | {ratio:.2f}")


if __name__ == "__main__":
    main()
