"""Training-step throughput through the SDK vs a plain in-process PEFT loop.

Measures, side by side in one run, on the same base model, LoRA shape and batch:
  peft         a plain PyTorch + PEFT loop in this process (forward, sum-CE backward, AdamW
               step), fp32: the loop a user writes
  peft-bf16    the same loop under bf16 autocast
  engine       tuneforge's engine called in this process (no HTTP, no scheduler), fp32
  sdk          the official tinker SDK against a tuneforge server subprocess on loopback
               (forward_backward + optim_step per step, waiting for both results), fp32
  engine-auto  the engine with the server's default compute dtype (`--dtype auto`: bf16
  sdk-auto     autocast on a CPU with native bf16 matmuls, else fp32), in process and through
               a second server started with that default
and prints tokens/s, each side's ratio against peft (fp32), the first-step loss difference of
each reduced-precision side against its fp32 counterpart, and sdk/engine (1 - HTTP and
scheduling overhead). Goal: sdk-auto / peft >= 1.25 (what a user of the default server gets
over their own fp32 loop); the fp32 and bf16 columns show how much of that is the engine and
how much the dtype. Rounds interleave all sides so that machine noise hits each of them;
per-step times are medians after warm-up. Torch threads are pinned: the measured side uses
--threads, the idle sides are never busy at the same time.

    python bench/step_overhead.py [--model tuneforge/tiny-qwen3-l] [--batch 8] [--seq 128]
                                  [--rank 16] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MODELS_DIR, ServerProcess, engine_busy, record

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def batch(vocab: int, n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, length + 1))
    return tokens[:, :-1], tokens[:, 1:]


class PeftLoop:
    def __init__(self, folder: Path, rank: int, inputs, targets, lr: float,
                 bf16: bool = False) -> None:
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        self.model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=MODULES))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.inputs = torch.from_numpy(inputs)
        self.targets = torch.from_numpy(targets)
        self.bf16 = bf16

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=self.inputs).logits
        logits = logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, self.targets[..., None])[..., 0]
        loss = -lp.sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class EngineLoop:
    def __init__(self, models_dir: Path, model: str, rank: int, inputs, targets, lr: float,
                 dtype: str = "fp32"):
        from tuneforge.engine.engine import Engine
        from tuneforge.engine.lora import LoRAConfig
        from tuneforge.engine.models import ModelRegistry
        from tuneforge.engine.optim import AdamParams
        from tuneforge.engine.types import Datum, ForwardBackwardInput
        from tuneforge.settings import Limits

        self.engine = Engine(ModelRegistry(models_dir, torch.device("cpu"), dtype=dtype),
                             Limits(), dtype=dtype)
        self.engine.create_model("bench", model, LoRAConfig(rank=rank, alpha=32.0, seed=0))
        self.inp = ForwardBackwardInput(
            data=[Datum(tokens=i.astype(np.int64), inputs={"target_tokens": t.astype(np.int64)})
                  for i, t in zip(inputs, targets, strict=True)], loss_fn="cross_entropy")
        self.hp = AdamParams(learning_rate=lr)

    def step(self) -> float:
        loss = self.engine.forward_backward("bench", self.inp).metrics["loss:sum"]
        self.engine.optim_step("bench", self.hp)
        return loss


class SdkLoop:
    def __init__(self, server: ServerProcess, model: str, rank: int, inputs, targets, lr: float):
        import tinker
        from tinker import types

        self.types = types
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        self.tc = sc.create_lora_training_client(base_model=model, rank=rank, seed=0).result()
        self.data = [types.Datum(model_input=types.ModelInput.from_ints(i.tolist()),
                                 loss_fn_inputs={"target_tokens": t.astype(np.int64)})
                     for i, t in zip(inputs, targets, strict=True)]
        self.hp = types.AdamParams(learning_rate=lr)

    def step(self) -> float:
        fb = self.tc.forward_backward(self.data, "cross_entropy")
        opt = self.tc.optim_step(self.hp)
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3-l")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per loop per round")
    ap.add_argument("--models-dir", default=str(MODELS_DIR))
    ap.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models_dir = Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    lr = 1e-4

    from tuneforge.engine.hardware import choose_dtype

    auto, why = choose_dtype("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        servers = {dtype: ServerProcess(Path(tmp) / dtype, models_dir, preload=(args.model,),
                                        threads=args.threads, env={"TUNEFORGE_DTYPE": dtype})
                   for dtype in ("fp32", "auto")}
        try:
            for server in servers.values():
                server.start()
            # The server built/loaded the model into models_dir; everything else reads it there.
            loops = {"peft": None, "peft-bf16": None,
                     "engine": EngineLoop(models_dir, args.model, args.rank, *_data(args), lr),
                     "sdk": SdkLoop(servers["fp32"], args.model, args.rank, *_data(args), lr),
                     "engine-auto": EngineLoop(models_dir, args.model, args.rank, *_data(args),
                                               lr, dtype=auto),
                     "sdk-auto": SdkLoop(servers["auto"], args.model, args.rank, *_data(args),
                                         lr)}
            folder = loops["engine"].engine.registry.get(args.model).tokenizer_dir
            loops["peft"] = PeftLoop(folder, args.rank, *_data(args), lr)
            loops["peft-bf16"] = PeftLoop(folder, args.rank, *_data(args), lr, bf16=True)
            first = {name: loop.step() for name, loop in loops.items()}  # warm-up
            times: dict[str, list[float]] = {name: [] for name in loops}
            busy = []  # engine-thread time of each fp32 SDK step, from the server's /metrics
            for _ in range(args.rounds):
                for name, loop in loops.items():
                    for _ in range(args.steps):
                        before = engine_busy(servers["fp32"]) if name == "sdk" else 0.0
                        t0 = time.perf_counter()
                        loop.step()
                        times[name].append(time.perf_counter() - t0)
                        if name == "sdk":
                            busy.append(engine_busy(servers["fp32"]) - before)
        finally:
            for server in servers.values():
                server.stop()

    tokens = args.batch * args.seq
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tps = {name: tokens / m for name, m in med.items()}
    print(f"model {args.model}, batch {args.batch}x{args.seq} tokens, LoRA rank {args.rank} "
          f"on all linear layers + lm_head, {args.threads} torch thread(s), "
          f"{args.rounds}x{args.steps} timed steps each; --dtype auto is {auto} here ({why})")
    print("first-step loss: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    for name in loops:
        print(f"  {name:11s} median step {med[name] * 1000:8.1f} ms   {tps[name]:8.0f} tokens/s"
              f"   x{tps[name] / tps['peft']:.3f} vs peft")
    pairs = [("peft-bf16", "peft"), ("engine-auto", "engine"), ("sdk-auto", "sdk"),
             ("engine", "peft")]
    diffs = {low: first[low] - first[ref] for low, ref in pairs}
    print("first-step loss difference: " + ", ".join(
        f"{low} - {ref} {diffs[low]:+.4f} (relative {diffs[low] / abs(first[ref]):+.1e})"
        for low, ref in pairs))
    ratio_auto = tps["sdk-auto"] / tps["peft"]
    ratio_peft = tps["sdk"] / tps["peft"]
    ratio_engine = tps["sdk"] / tps["engine"]
    print(f"sdk-auto / peft = {ratio_auto:.3f}   (goal >= 1.25)")
    print(f"sdk / peft      = {ratio_peft:.3f}   (both fp32)")
    served = statistics.median(b / t for b, t in zip(busy, times["sdk"], strict=True))
    print(f"sdk / engine    = {ratio_engine:.3f}   (in-process engine vs server: two processes)")
    print(f"server engine busy {served * 100:.1f}% of each SDK step: HTTP, futures and "
          f"scheduling {(1 - served) * 100:.1f}% (goal <= 5%)")
    if args.record:
        record("step_overhead", f"{args.model} | {args.batch}x{args.seq}, r{args.rank}, "
               f"{args.threads} thr, {args.rounds}x{args.steps} steps | "
               f"{tps['peft']:.0f} / {tps['engine']:.0f} / {tps['sdk']:.0f} | "
               f"{ratio_peft:.2f} | {ratio_engine:.2f} | {(1 - served) * 100:.1f}% | "
               f"{tps['peft-bf16']:.0f} / {tps['engine-auto']:.0f} / {tps['sdk-auto']:.0f} "
               f"({auto}) | {ratio_auto:.2f} | {diffs['sdk-auto']:+.4f}")


def _data(args):
    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    return batch(vocab, args.batch, args.seq)


if __name__ == "__main__":
    main()
