"""QLoRA on CPU: a 4-bit NF4 base model against the fp32 one, through the engine.

Everything runs through tuneforge's engine in this process (`Engine.forward_backward` with sum
cross-entropy, then `optim_step`), on SmolLM2-135M-Instruct as the server serves it
(`HuggingFaceTB/SmolLM2-135M-Instruct` vs `HuggingFaceTB/SmolLM2-135M-Instruct@nf4` through
ModelRegistry, double quantization on), LoRA rank 16 on every linear layer and `lm_head`, one
batch of random tokens (default 4x128). It prints one table:

  size    bytes of the quantized linear layers (packed 4-bit weights plus their absmax, double-
          quantization constants and codebooks) against the same layers in fp32 (goal <= 0.14),
          and the whole base against the fp32 base (goal <= 0.45; the tied embedding / lm_head
          and the norms stay fp32, so they bound the saving on a model this small)
  speed   median training step time of nf4 against fp32 (goal <= 1.3), both with fp32 compute;
          and bf16 compute (autocast, and bnb_4bit_compute_dtype=bf16 for nf4) against fp32, the
          choice `--dtype auto` makes on this CPU (the script prints it, and why). The configured
          steps are interleaved round by round (the order rotating) so machine drift hits all
          of them; one warm-up step each is not timed
  memory  peak memory of one training step, for fp32, fp32 + gradient checkpointing, nf4 and
          nf4 + gradient checkpointing (fp32 compute), against fp32

How memory is measured (CPU): each configuration runs in a fresh subprocess, started with glibc's
`MALLOC_MMAP_THRESHOLD_=65536`, so every allocation of 64 KiB or more (every tensor that matters)
is its own mapping and goes back to the OS when freed (a fixed threshold also stops glibc from
raising it after frees); peak RSS then follows live tensor memory, not what the allocator keeps.
The child loads the base, creates the adapter, runs one warm-up step (gradients, AdamW state,
oneDNN caches come into being), collects garbage and `malloc_trim`s, reads its resident set size
(`before`: base + adapter + optimizer state + the Python/torch runtime), resets the kernel's
high-water mark (`echo 5 > /proc/self/clear_refs`), runs a training step and reads the high-water
mark `VmHWM` (`peak`): the exact peak RSS during that step, not a sampled one. It does that for
two steps and keeps the larger. The table shows `peak` (what the process needed) and `peak -
before` (what the step itself added: activations kept for the backward pass, dequantized weight
temporaries, logits, gradients); both against fp32. `peak` is shown above the RSS the child had
right after importing torch, transformers, bitsandbytes and the engine (the same runtime in
every configuration), with, in brackets, how much of the RSS before the step was file-backed
(`RssFile` above the runtime's): the safetensors checkpoint mapped into memory. For the fp32 base
those pages are its weights; for an nf4 base they are the fp32 checkpoint it was quantized from,
still mapped as long as any tensor of the loaded model is a view into it. Clean file pages can be
dropped by the kernel under pressure, but they count in RSS. Where `/proc/self/clear_refs`
cannot be written, it falls back to sampling VmRSS every millisecond from a thread (and says so).

    python bench/qlora.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--batch 4] [--seq 128]
                          [--rank 16] [--threads 1] [--rounds 3] [--record]
                          [--skip-memory | --memory-only]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import MODELS_DIR, REPO, median, record

# name: (quantized base?, compute dtype, gradient checkpointing)
CONFIGS = {
    "fp32": (False, "fp32", False),
    "nf4": (True, "fp32", False),
    "fp32-bf16": (False, "bf16", False),
    "nf4-bf16": (True, "bf16", False),
    "fp32-ckpt": (False, "fp32", True),
    "nf4-ckpt": (True, "fp32", True),
}
TIMED = ("fp32", "nf4", "fp32-bf16", "nf4-bf16")
MEASURED = ("fp32", "fp32-ckpt", "nf4", "nf4-ckpt")
LR = 1e-4


class Loop:
    """One training model on one engine: a base (quantized or not) and a compute dtype."""

    def __init__(self, models_dir: Path, model: str, config: str, rank: int, inputs, targets):
        from tuneforge.engine.engine import Engine
        from tuneforge.engine.lora import LoRAConfig
        from tuneforge.engine.models import ModelRegistry
        from tuneforge.engine.optim import AdamParams
        from tuneforge.engine.types import Datum, ForwardBackwardInput
        from tuneforge.settings import Limits

        quantized, dtype, checkpoint = CONFIGS[config]
        self.name = f"{model}@nf4" if quantized else model
        self.registry = ModelRegistry(models_dir, torch.device("cpu"), dtype=dtype)
        self.engine = Engine(self.registry, Limits(), dtype=dtype)
        self.engine.create_model("bench", self.name, LoRAConfig(rank=rank, alpha=32.0, seed=0),
                                 gradient_checkpointing=checkpoint)
        self.base = self.registry.get(self.name)
        self.inp = ForwardBackwardInput(
            data=[Datum(tokens=i.astype(np.int64), inputs={"target_tokens": t.astype(np.int64)})
                  for i, t in zip(inputs, targets, strict=True)], loss_fn="cross_entropy")
        self.hp = AdamParams(learning_rate=LR)

    def step(self) -> float:
        loss = self.engine.forward_backward("bench", self.inp).metrics["loss:sum"]
        self.engine.optim_step("bench", self.hp)
        return loss


def batch(vocab: int, n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, length + 1))
    return tokens[:, :-1], tokens[:, 1:]


def _data(args):
    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    return batch(vocab, args.batch, args.seq)


# ---- sizes -----------------------------------------------------------------------------------

def sizes(fp32: Loop, nf4: Loop) -> dict[str, float]:
    """Bytes of the quantized linear layers (packed weights + statistics) and of the whole bases."""
    from tuneforge.engine import quantized

    layers = quantized.quantized_layers(nf4.base.model)
    seen: dict[int, torch.Tensor] = {}
    dense = 0
    for _, layer in layers:
        w = layer.weight
        seen[id(w)] = w
        state = getattr(w, "quant_state", None)
        if state is not None:
            for t in quantized._state_tensors(state):
                seen[id(t)] = t
        if layer.bias is not None:
            seen[id(layer.bias)] = layer.bias
        dense += (layer.in_features * layer.out_features
                  + (layer.out_features if layer.bias is not None else 0)) * 4
    packed = sum(t.numel() * t.element_size() for t in seen.values())
    return {"layers": len(layers), "q_layers_bytes": packed, "fp32_layers_bytes": dense,
            "nf4_base_bytes": nf4.base.nbytes, "fp32_base_bytes": fp32.base.nbytes}


# ---- memory (child processes) ----------------------------------------------------------------

def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024  # it did reset


class _Sampler:
    """Fallback: the highest VmRSS seen by a thread reading it every millisecond."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child_memory(args) -> None:
    """Run in a fresh process: peak RSS of a training step of one configuration; JSON on stdout."""
    torch.set_num_threads(args.threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    # The runtime every configuration carries (bitsandbytes imported in all of them alike).
    import bitsandbytes  # noqa: F401
    import transformers  # noqa: F401

    import tuneforge.engine.engine  # noqa: F401

    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    runtime, runtime_file = _status_kib("VmRSS"), _status_kib("RssFile")
    t0 = time.perf_counter()
    loop = Loop(Path(args.models_dir), args.model, args.child_memory, args.rank, *_data(args))
    load_s = time.perf_counter() - t0
    loss = loop.step()  # warm-up: gradients, AdamW state, kernel caches
    method = "VmHWM after clear_refs"
    results = []
    for _ in range(2):
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        before, file_backed = _status_kib("VmRSS"), _status_kib("RssFile")
        if _reset_hwm():
            loop.step()
            peak = _status_kib("VmHWM")
        else:
            method = "VmRSS sampled every 1 ms"
            with _Sampler() as s:
                loop.step()
            peak = max(s.peak, before)
        results.append((peak, before, file_backed))
    peak, before, file_backed = max(results)
    print(json.dumps({"config": args.child_memory, "peak": peak << 10, "before": before << 10,
                      "growth": (peak - before) << 10, "runtime": runtime << 10,
                      "model": (peak - runtime) << 10,
                      "file_backed": (file_backed - runtime_file) << 10, "method": method,
                      "loss": loss, "load_s": load_s}))


def measure_memory(args, config: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", config,
           "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--threads", str(args.threads),
           "--models-dir", args.models_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"memory child {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- main --------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s+(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--models-dir", default=str(MODELS_DIR))
    ap.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only the memory subprocesses")
    ap.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    ap.add_argument("--child-memory", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    if args.child_memory:
        child_memory(args)
        return
    torch.set_num_threads(args.threads)
    from tuneforge.engine import hardware

    started = time.perf_counter()
    auto, why = hardware.choose_dtype("auto", torch.device("cpu"))
    # Build (convert) the model once before anything is measured.
    from tuneforge.engine.models import ModelRegistry

    ModelRegistry(Path(args.models_dir), torch.device("cpu")).resolve(args.model)

    memory = {}
    if not args.skip_memory:
        for config in MEASURED:  # before the timing loops: nothing else busy meanwhile
            memory[config] = measure_memory(args, config)
    if args.memory_only:
        mib = 2 ** 20
        for c in MEASURED:
            m = memory[c]
            print(f"{c:10s} step peak above runtime {m['model'] / mib:6.0f} MiB "
                  f"({m['model'] / memory['fp32']['model']:.3f}x; file-backed "
                  f"{m['file_backed'] / mib:.0f}), step growth {m['growth'] / mib:5.0f} MiB "
                  f"({m['growth'] / memory['fp32']['growth']:.3f}x)")
        return

    loops = {c: Loop(Path(args.models_dir), args.model, c, args.rank, *_data(args))
             for c in TIMED}
    size = sizes(loops["fp32"], loops["nf4"])
    first = {c: loop.step() for c, loop in loops.items()}  # warm-up, not timed
    times: dict[str, list[float]] = {c: [] for c in loops}
    order = list(loops)
    for r in range(args.rounds):
        for c in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            loops[c].step()
            times[c].append(time.perf_counter() - t0)
    med = {c: median(ts) for c, ts in times.items()}
    tokens = args.batch * args.seq

    cpu = cpu_model()
    q_ratio = size["q_layers_bytes"] / size["fp32_layers_bytes"]
    base_ratio = size["nf4_base_bytes"] / size["fp32_base_bytes"]
    speed = med["nf4"] / med["fp32"]
    bf16 = med["fp32-bf16"] / med["fp32"]
    nf4_bf16 = med["nf4-bf16"] / med["nf4"]
    mib = 2 ** 20
    print(f"model {args.model}, batch {args.batch}x{args.seq} tokens, LoRA rank {args.rank} on all "
          f"linear layers + lm_head, engine forward_backward + optim_step, {args.threads} torch "
          f"thread(s), {args.rounds} interleaved timed steps each; CPU {cpu}")
    print(f"--dtype auto chooses {auto} on this machine: {why}")
    print("first-step loss: " + ", ".join(f"{c} {v:.1f}" for c, v in first.items()))
    print(f"{'measure':44s} {'value':>22s} {'ratio':>8s} {'goal':>8s}")
    rows = [
        (f"quantized linear layers ({size['layers']}), nf4 vs fp32",
         f"{size['q_layers_bytes'] / mib:.1f} / {size['fp32_layers_bytes'] / mib:.1f} MiB",
         q_ratio, "<= 0.14"),
        ("whole base, nf4 vs fp32",
         f"{size['nf4_base_bytes'] / mib:.1f} / {size['fp32_base_bytes'] / mib:.1f} MiB",
         base_ratio, "<= 0.45"),
        ("step time nf4 / fp32 (fp32 compute)",
         f"{med['nf4'] * 1e3:.0f} / {med['fp32'] * 1e3:.0f} ms", speed, "<= 1.3"),
        ("step time fp32 base: bf16 / fp32 compute",
         f"{med['fp32-bf16'] * 1e3:.0f} / {med['fp32'] * 1e3:.0f} ms", bf16, "< 1"),
        ("step time nf4 base: bf16 / fp32 compute",
         f"{med['nf4-bf16'] * 1e3:.0f} / {med['nf4'] * 1e3:.0f} ms", nf4_bf16, "< 1"),
        ("step time nf4 bf16 / fp32 fp32 (auto vs fp32)",
         f"{med['nf4-bf16'] * 1e3:.0f} / {med['fp32'] * 1e3:.0f} ms",
         med["nf4-bf16"] / med["fp32"], "–"),
    ]
    if memory:
        ref = memory["fp32"]
        for c in MEASURED:
            m = memory[c]
            rows.append((f"step peak above runtime, {c}",
                         f"{m['model'] / mib:.0f} MiB (file {m['file_backed'] / mib:.0f})",
                         m["model"] / ref["model"], "–"))
        for c in MEASURED:
            m = memory[c]
            rows.append((f"step's own RSS growth, {c}", f"{m['growth'] / mib:.0f} MiB",
                         m["growth"] / ref["growth"], "–"))
    for label, value, ratio, goal in rows:
        print(f"{label:44s} {value:>22s} {ratio:8.3f} {goal:>8s}")
    print("tokens/s: " + ", ".join(f"{c} {tokens / m:.0f}" for c, m in med.items()))
    if memory:
        print(f"memory: {memory['fp32']['method']}, one fresh process per configuration "
              f"(MALLOC_MMAP_THRESHOLD_=65536); 'above runtime' is the step's peak RSS minus "
              f"the RSS after importing torch, transformers, bitsandbytes and the engine "
              f"({memory['fp32']['runtime'] / mib:.0f} MiB): base, adapter, AdamW state and the "
              f"step's transients ('file': the part of it that is the mapped checkpoint file); "
              f"'growth' is the peak minus the RSS just before the step")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.record:
        mem = "–"
        if memory:
            ref = memory["fp32"]
            mem = " / ".join(f"{memory[c]['model'] / ref['model']:.2f}" for c in MEASURED[1:])
            mem += " (growth " + " / ".join(f"{memory[c]['growth'] / ref['growth']:.2f}"
                                           for c in MEASURED[1:]) + ")"
            mem += f"; fp32 {ref['model'] / mib:.0f} MiB (growth {ref['growth'] / mib:.0f})"
        record("qlora", f"{args.model} | {cpu}, {args.threads} thr | {args.batch}x{args.seq}, "
               f"r{args.rank}, {args.rounds} steps | {q_ratio:.3f} | {base_ratio:.3f} | "
               f"{speed:.2f} ({med['nf4'] * 1e3:.0f} / {med['fp32'] * 1e3:.0f} ms) | {mem} | "
               f"{bf16:.2f} / {nf4_bf16:.2f} (auto: {auto})")


if __name__ == "__main__":
    main()
