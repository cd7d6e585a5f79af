"""Hundreds of adapters on one base model within a memory budget.

Registers N rank-8 training clients on SmolLM2 (every linear layer and lm_head adapted), trains
each one step (so each carries gradients' and AdamW's state), with the server's adapter budget
set to --budget-mb. Reports how many stay resident, the adapter memory the server accounts for
against the budget, the server's peak resident memory, the offload directory's size, and the
latency of a request whose adapter must first come back from disk vs one already resident
(medians).

    python bench/memory.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--adapters 200]
                           [--budget-mb 512] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import median, record, start_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--budget-mb", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import tinker
    from tinker import types

    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    tokens = np.random.default_rng(0).integers(0, vocab, 17)
    datum = [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": tokens[1:]})]
    adam = types.AdamParams(learning_rate=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), args.model, args.threads,
                              TUNEFORGE_ADAPTER_MEMORY_MB=str(args.budget_mb))
        try:
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            started = time.perf_counter()
            clients = [sc.create_lora_training_client(base_model=args.model, rank=8, seed=i)
                       for i in range(args.adapters)]
            clients = [c.result() for c in clients]
            for tc in clients:
                tc.forward_backward(datum, "cross_entropy")
                tc.optim_step(adam)
            for tc in clients:  # wait for the last step of each
                tc.forward(datum, "cross_entropy").result()
            setup = time.perf_counter() - started
            m = server.metrics()
            where = {w: int(m.get(f'tuneforge_training_models{{where="{w}"}}', 0))
                     for w in ("device", "cpu", "disk")}
            offloaded = sum(f.stat().st_size for f in (Path(tmp) / "offload").glob("*.pt"))

            def latency(tc) -> float:
                t0 = time.perf_counter()
                tc.forward(datum, "cross_entropy").result()
                return time.perf_counter() - t0

            resident, cold = [], []
            for i in range(5):
                resident.append(latency(clients[-1]))  # the most recently used: resident
                cold.append(latency(clients[i * 7]))  # long unused: on disk
        finally:
            server.stop()
    per_adapter = m["tuneforge_adapter_memory_bytes"] / max(where["device"], 1)
    print(f"model {args.model}: {args.adapters} rank-8 adapters (all linear layers + lm_head), "
          f"each trained one step; adapter budget {args.budget_mb} MB; {args.threads} thread(s)")
    print(f"  setup (create + one step each): {setup:.1f} s")
    print(f"  resident {where['device']}, on CPU {where['cpu']}, on disk {where['disk']}; "
          f"about {per_adapter / 2**20:.1f} MB per trained adapter (weights, gradients, AdamW)")
    print(f"  adapter memory {m['tuneforge_adapter_memory_bytes'] / 2**20:.0f} MB of "
          f"{m['tuneforge_adapter_memory_limit_bytes'] / 2**20:.0f} MB budget; offloaded to disk "
          f"{offloaded / 2**20:.0f} MB")
    print(f"  server peak resident memory {m['tuneforge_process_max_resident_bytes'] / 2**30:.2f}"
          f" GiB (base model {sum(v for k, v in m.items() if 'base_model_bytes' in k) / 2**20:.0f}"
          f" MB)")
    print(f"  forward of 16 tokens: resident adapter {median(resident) * 1000:.0f} ms, "
          f"adapter back from disk {median(cold) * 1000:.0f} ms (median of 5)")
    if args.record:
        record("memory", f"{args.model} | {args.adapters} x rank 8, budget {args.budget_mb} MB "
               f"| {where['device']} / {where['disk']} | "
               f"{m['tuneforge_adapter_memory_bytes'] / 2**20:.0f} MB | "
               f"{m['tuneforge_process_max_resident_bytes'] / 2**30:.2f} GiB | "
               f"{median(resident) * 1000:.0f} / {median(cold) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
