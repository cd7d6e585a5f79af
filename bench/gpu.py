"""The engine on one GPU: correctness on CUDA, LoRA training MFU, tenants sharing a pass, decoding
against transformers' `generate`, and the adapter offload round trip.

A prepared check for one CUDA GPU (an H200) without network, through tuneforge's engine itself
(`Engine.forward_backward[_batch]`, `optim_step`, `sample`, `admit` / `decode_step`,
`residency.move`), not through the server. Two parts, each in its own subprocess with its own
time box (a part that fails or runs out of time keeps what it measured; the next one runs; in
the throughput part each section, and each training size, fails alone, out of memory say):

  correctness  the built-in `tuneforge/tiny-qwen3` on the device, LoRA rank 8 on every linear
               layer and `lm_head`, B set non-zero so the adapter matters:
               - lora-vs-peft: the engine in bf16 autocast against PEFT's `LoraLayer` with the
                 same weights under the same autocast: sum cross-entropy loss and every target
                 logprob, relative <= 1e-2 (LoRA gradients reported beside them)
               - ce-fp32: the engine in fp32 (TF32 off) against a reference that merges each
                 adapter into its weight (`W + s * B @ A`) and runs the unmodified transformers
                 model in float64: loss relative <= 1e-5, LoRA gradients <= 1e-4 of their scale
               - ce-bf16: the same reference against the engine in bf16 autocast: loss relative
                 <= 2e-2, cosine of all LoRA gradients >= 0.99
               - sampler-vs-trainer (fp32 and bf16): `Engine.sample` of a snapshot sampler of
                 the adapter (temperature 1, prompt logprobs) against `forward` logprobs of the
                 same prompt + sampled tokens: max abs difference <= 1e-3 (fp32), <= 5e-2 (bf16)
               - lean-decode (fp32 and bf16): greedy decoding of that snapshot by the lean
                 forward (engine/fast_decode.py) against the transformers forward: the same
                 tokens, logprobs within 1e-4 (fp32), 5e-2 (bf16)
  throughput   a random Qwen3-8B-shaped model (hidden 4096, 36 layers, 32 heads, 8 KV heads,
               intermediate 12288, vocab 151936, untied lm_head) built in GPU memory from its
               config (no checkpoint, no download), bf16 weights, the engine in bf16 autocast:
               - matmul: the bf16 matmul rate of the device (8192^3, median), the MFU baseline
               - train: LoRA rank 16 steps (forward_backward + optim_step) at 2048, 4096 and
                 8192 tokens per step (sequences of 2048): tokens/s and MFU with 4N accounting
                 (4 * N * tokens FLOPs per step: forward 2N, activation gradients 2N, no weight
                 gradients; N = the base model's parameters less the input embedding, a lookup)
                 against the measured matmul rate; goal MFU >= 45%
               - offload: the trained rank-16 adapter with its gradients and AdamW moments,
                 GPU -> CPU -> GPU by `residency.move` (median of 3), tensors compared after
               - tenants: 8 adapters x 1 sequence of 512 tokens in one forward_backward_batch
                 against the same 8 requests one after another; goal >= 3x
               - decode: greedy decoding of a base sampler, batch 1 (`Engine.sample`) and batch
                 64 (64 requests by `Engine.admit` + `decode_step`), prompts of 128 tokens, 128
                 new tokens each, against `model.generate` (greedy, the same number of tokens,
                 the same model); goals >= 1.5x (batch 1) and >= 5x (batch 64)

On the GPU machine (torch, transformers and peft there; pydantic and pydantic-settings, which
the engine imports, copied over as wheels by `bash bench/gpu_setup.sh prepare` in
.cache/gpu-wheels), one command of under 8 minutes:

    bash bench/gpu_setup.sh install && python3 bench/gpu.py [--budget 420]

Here, on CPU (`--smoke`: the tiny model for correctness, a 2-layer tiny Qwen3 for throughput,
fp32, a few steps, seconds; the goals are printed but mean nothing there):

    .venv/bin/python bench/gpu.py --smoke

Prints one table (each goal beside its measurement, met / missed; correctness rows pass /
FAIL); writes `gpu.json` (every number, and the table) and `gpu.log` (the parts' output) under
$OUT when that is set, or under --out. Exits 1 when a correctness check fails or a part or
section could not run; a missed goal does not change the exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("TUNEFORGE_GPU_SITE", "/tmp/tuneforge-site"))  # gpu_setup.sh install
for p in (SITE, REPO, REPO / "bench"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpu_qlora import (  # noqa: E402
    QWEN3_8B,
    SMOKE,
    _Partial,
    _strict_fp32,
    _sync,
    _tiny_folder,
    build_random,
    in_memory_registry,
)

TINY = "tuneforge/tiny-qwen3"
SYNTHETIC = "random/qwen3-8b"
PARTS = ("correctness", "throughput")
BOXES = {"correctness": 120, "throughput": 330}  # seconds, imports and the model build included
GOALS = {"mfu": 0.45, "tenants": 3.0, "decode_1": 1.5, "decode_64": 5.0}
TOL = {"peft": 1e-2, "ce_loss": 1e-5, "ce_grad": 1e-4, "bf16_loss": 2e-2, "bf16_cos": 0.99,
       "sampler_fp32": 1e-3, "sampler_bf16": 5e-2, "lean_fp32": 1e-4, "lean_bf16": 5e-2}


# ---- shared pieces ---------------------------------------------------------------------------

def _device(args):
    import torch

    return torch.device("cpu" if args.smoke else "cuda")


def _input(rows, loss_fn="cross_entropy", forward_only=False):
    """A ForwardBackwardInput of (tokens, targets[, weights]) rows."""
    import numpy as np

    from tuneforge.engine.types import Datum, ForwardBackwardInput

    data = []
    for row in rows:
        inputs = {"target_tokens": np.asarray(row[1], dtype=np.int64)}
        if len(row) > 2:
            inputs["weights"] = np.asarray(row[2], dtype=np.float32)
        data.append(Datum(tokens=np.asarray(row[0], dtype=np.int64), inputs=inputs))
    return ForwardBackwardInput(data=data, loss_fn=loss_fn, forward_only=forward_only)


def _random_rows(vocab: int, batch: int, seq: int, seed: int):
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1))
    return [(t[:-1], t[1:]) for t in tokens]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _norm_rel(a, b) -> float:
    """|a - b| / |b| over whole tensors (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


# ---- correctness -----------------------------------------------------------------------------

def _make_adapter(engine, model_id: str, rank: int = 8):
    """A training model on the tiny base with B non-zero (the same B in every engine)."""
    import torch

    from tuneforge.engine.lora import LoRAConfig

    engine.create_model(model_id, TINY, LoRAConfig(rank=rank, alpha=32.0, seed=0))
    tm = engine.model(model_id)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path in sorted(tm.adapter.B):
            b = tm.adapter.B[path]
            b.copy_((torch.randn(b.shape, generator=gen) * 0.05).to(b.device))
    return tm


def _weighted_rows(vocab: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for n in (33, 64, 17):
        weights = rng.normal(size=n).astype(np.float32)  # signed, non-binary
        weights[0] = 0.0
        rows.append((rng.integers(0, vocab, n), rng.integers(0, vocab, n), weights))
    return rows


def _grads(tm):
    return {name: t.grad.detach().clone() for name, t in tm.adapter.named_tensors()}


def merged_reference(folder, adapter, rows, device):
    """Loss, logprobs and d loss / d (A, B) in float64 with each adapter merged into its
    weight, through the unmodified transformers model (no code path shared with LoRALinear)."""
    import torch
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).to(device)
    model.eval()
    A = {p: a.detach().double().requires_grad_(True) for p, a in adapter.A.items()}
    B = {p: b.detach().double().requires_grad_(True) for p, b in adapter.B.items()}
    # a tied lm_head shares its weight with the embedding: merge into lm_head's use only
    merged = {f"{p}.weight": model.get_submodule(p).weight + adapter.scaling * B[p] @ A[p]
              for p in A}
    total, logprobs = torch.zeros((), dtype=torch.float64, device=device), []
    for tokens, targets, weights in rows:
        ids = torch.as_tensor(tokens, device=device)[None]
        logits = functional_call(model, merged, args=(), kwargs={"input_ids": ids},
                                 tie_weights=False).logits[0]
        lp = torch.log_softmax(logits, -1).gather(
            1, torch.as_tensor(targets, device=device)[:, None])[:, 0]
        total = total - (lp * torch.as_tensor(weights, device=device).double()).sum()
        logprobs.append(lp.detach())
    total.backward()
    grads, total = {}, total.detach()
    for p in A:
        grads[f"{p}.lora_A"], grads[f"{p}.lora_B"] = A[p].grad, B[p].grad
    del model
    return float(total), logprobs, grads


def peft_pass(folder, adapter, rows, device, dtype: str):
    """Loss, logprobs and LoRA gradients of PEFT's LoRA with `adapter`'s weights, under the
    engine's autocast."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    model.eval()
    modules = sorted({p.rsplit(".", 1)[-1] for p in adapter.A})
    pm = peft.get_peft_model(model, peft.LoraConfig(r=adapter.config.rank,
                                                    lora_alpha=adapter.config.alpha,
                                                    lora_dropout=0.0, target_modules=modules))
    layers = {}
    with torch.no_grad():
        for name, module in pm.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                path = name.removeprefix("base_model.model.")
                module.lora_A["default"].weight.copy_(adapter.A[path])
                module.lora_B["default"].weight.copy_(adapter.B[path])
                layers[path] = module
    if set(layers) != set(adapter.A):
        raise RuntimeError(f"PEFT wrapped {len(layers)} layers, the adapter has {len(adapter.A)}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    total, logprobs = torch.zeros((), dtype=torch.float32, device=device), []
    for tokens, targets, weights in rows:
        with autocast:
            logits = pm(input_ids=torch.as_tensor(tokens, device=device)[None]).logits[0]
        lp = torch.log_softmax(logits.float(), -1).gather(
            1, torch.as_tensor(targets, device=device)[:, None])[:, 0]
        total = total - (lp * torch.as_tensor(weights, device=device)).sum()
        logprobs.append(lp.detach())
    total.backward()
    grads, total = {}, total.detach()
    for path, module in layers.items():
        grads[f"{path}.lora_A"] = module.lora_A["default"].weight.grad
        grads[f"{path}.lora_B"] = module.lora_B["default"].weight.grad
    return float(total), logprobs, grads


def _engine_pass(engine, model_id, rows):
    import torch

    tm = engine.model(model_id)
    tm.optimizer.zero_grad()
    result = engine.forward_backward(model_id, _input(rows))
    return (result.metrics["loss:sum"],
            [torch.from_numpy(o["logprobs"]) for o in result.outputs], _grads(tm))


def _sampler_vs_trainer(engine, model_id, vocab: int, seed: int) -> dict:
    """Sampled-token and prompt logprobs of `Engine.sample` (temperature 1) against the
    trainer's `forward` logprobs of the same tokens."""
    import numpy as np

    from tuneforge.engine.sampler import SampleRequest, SamplingParams

    prompt = np.random.default_rng(seed).integers(0, vocab, 24).tolist()
    engine.add_sampler_snapshot(f"{model_id}-sampler", model_id)
    res = engine.sample(f"{model_id}-sampler", SampleRequest(
        prompt=prompt, num_samples=1, prompt_logprobs=True,
        params=SamplingParams(max_tokens=16, temperature=1.0, seed=seed)))
    seq = res.sequences[0]
    full = prompt + seq.tokens
    out = engine.forward_backward(model_id, _input([(full[:-1], full[1:])], forward_only=True))
    trainer = out.outputs[0]["logprobs"].astype(np.float64)
    p = len(prompt)
    prompt_diff = np.abs(trainer[: p - 1] - res.prompt_logprobs[1:]).max()
    sample_diff = np.abs(trainer[p - 1:] - np.asarray(seq.logprobs)).max()
    return {"prompt_max_abs": float(prompt_diff), "sampled_max_abs": float(sample_diff),
            "sampled_tokens": len(seq.tokens), "max_abs": float(max(prompt_diff, sample_diff))}


def _lean_vs_transformers(engine, model_id, vocab: int, seed: int) -> dict:
    """Greedy decoding of a snapshot sampler by the lean forward (engine/fast_decode.py) and by
    the transformers forward: the same tokens, and their logprobs."""
    import numpy as np

    from tuneforge.engine import decoder
    from tuneforge.engine.sampler import SampleRequest, SamplingParams

    prompt = np.random.default_rng(seed).integers(0, vocab, 24).tolist()
    request = SampleRequest(prompt=prompt, num_samples=1, prompt_logprobs=True,
                            params=SamplingParams(max_tokens=32, temperature=0.0))
    adapter = engine.model(model_id).adapter.snapshot()
    base = engine.model(model_id).base
    lean, ref = (decoder.sample_alone(base, adapter, request, engine.dtype, lean=flag)
                 for flag in (True, False))
    a, b = lean.sequences[0], ref.sequences[0]
    same = a.tokens == b.tokens
    diff = np.abs(np.asarray(a.logprobs) - np.asarray(b.logprobs)).max() if same else np.inf
    prompt_diff = np.abs(np.asarray(lean.prompt_logprobs[1:])
                         - np.asarray(ref.prompt_logprobs[1:])).max()
    return {"same_tokens": same, "tokens": len(a.tokens),
            "max_abs": float(max(diff, prompt_diff))}


def part_correctness(args, out: _Partial) -> None:
    import torch

    from tuneforge.engine.engine import Engine
    from tuneforge.engine.models import ModelRegistry
    from tuneforge.settings import Limits

    _strict_fp32()
    device = _device(args)
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    import peft
    import transformers

    out.update(transformers=transformers.__version__, peft=peft.__version__)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    registry = ModelRegistry(Path(args.models_dir), device, dtype="fp32")
    base = registry.get(TINY)
    folder, vocab = base.tokenizer_dir, base.vocab_size
    rows = _weighted_rows(vocab, 2)
    engines = {dtype: Engine(registry, Limits(), dtype=dtype) for dtype in ("fp32", "bf16")}
    tms = {dtype: _make_adapter(eng, f"m-{dtype}") for dtype, eng in engines.items()}
    adapter = tms["fp32"].adapter
    ref_loss, ref_lp, ref_grads = merged_reference(folder, adapter, rows, device)
    ok = True

    # the engine in bf16 against PEFT in bf16
    loss, lps, grads = _engine_pass(engines["bf16"], "m-bf16", rows)
    p_loss, p_lps, p_grads = peft_pass(folder, tms["bf16"].adapter, rows, device, "bf16")
    lp_rel = _norm_rel(torch.cat(lps), torch.cat([x.cpu() for x in p_lps]))
    grad_rel = _norm_rel(torch.cat([grads[k].flatten().cpu() for k in sorted(grads)]),
                         torch.cat([p_grads[k].flatten().cpu() for k in sorted(grads)]))
    row = {"loss": loss, "peft_loss": p_loss, "loss_rel": _rel(loss, p_loss),
           "logprobs_rel": lp_rel, "grads_rel": grad_rel}
    row["ok"] = row["loss_rel"] <= TOL["peft"] and lp_rel <= TOL["peft"]
    out["lora_vs_peft_bf16"] = row
    ok &= row["ok"]

    # cross-entropy loss and LoRA gradients against the float64 merged reference
    for dtype in ("fp32", "bf16"):
        loss, lps, grads = _engine_pass(engines[dtype], f"m-{dtype}", rows)
        worst = max(float((grads[k].double() - ref_grads[k]).abs().max())
                    / (float(ref_grads[k].abs().max()) + 1e-8) for k in ref_grads)
        flat = torch.cat([grads[k].double().flatten() for k in sorted(ref_grads)])
        ref_flat = torch.cat([ref_grads[k].flatten() for k in sorted(ref_grads)])
        cos = float(torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0))
        lp_abs = max(float((a.double() - b.cpu()).abs().max())
                     for a, b in zip(lps, ref_lp, strict=True))
        row = {"loss": loss, "ref_loss": ref_loss, "loss_rel": _rel(loss, ref_loss),
               "grad_max_rel": worst, "grad_cos": cos, "logprobs_max_abs": lp_abs}
        if dtype == "fp32":
            row["ok"] = row["loss_rel"] <= TOL["ce_loss"] and worst <= TOL["ce_grad"]
        else:
            row["ok"] = row["loss_rel"] <= TOL["bf16_loss"] and cos >= TOL["bf16_cos"]
        out[f"ce_{dtype}"] = row
        ok &= row["ok"]

    # sampler vs trainer logprobs
    for dtype in ("fp32", "bf16"):
        row = _sampler_vs_trainer(engines[dtype], f"m-{dtype}", vocab, 3)
        row["ok"] = row["max_abs"] <= TOL[f"sampler_{dtype}"]
        out[f"sampler_{dtype}"] = row
        ok &= row["ok"]

    # the lean decoding forward against the transformers one
    for dtype in ("fp32", "bf16"):
        row = _lean_vs_transformers(engines[dtype], f"m-{dtype}", vocab, 4)
        row["ok"] = row["same_tokens"] and row["max_abs"] <= TOL[f"lean_{dtype}"]
        out[f"lean_{dtype}"] = row
        ok &= row["ok"]
    out["ok_checks"] = bool(ok)


# ---- throughput ------------------------------------------------------------------------------

def matmul_rate(device, dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul (median of `reps`)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        times.append((time.perf_counter() - t0) / 5)
    return 2 * n**3 / statistics.median(times)


def _timed(device, fn) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def part_throughput(args, out: _Partial) -> None:
    import torch

    from tuneforge.engine import residency
    from tuneforge.engine.engine import Engine
    from tuneforge.engine.lora import LoRAConfig
    from tuneforge.engine.optim import AdamParams
    from tuneforge.settings import Limits

    device = _device(args)
    cuda = device.type == "cuda"
    spec = SMOKE if args.smoke else QWEN3_8B
    weights = torch.float32 if args.smoke else torch.bfloat16
    dtype = "fp32" if args.smoke else "bf16"
    tokenizer_dir = _tiny_folder(args)
    deadline = args.deadline

    def time_left(need: float) -> bool:
        return time.time() + need < deadline

    # the device's matmul rate, the MFU baseline
    n = 1024 if args.smoke else 8192
    rate = matmul_rate(device, weights, n, 5 if args.smoke else 20)
    out["matmul"] = {"n": n, "dtype": str(weights), "flops_per_s": rate}

    registry = in_memory_registry(
        Path(args.models_dir), device, dtype, tokenizer_dir, SYNTHETIC,
        lambda: build_random(spec, weights, device, False, torch.bfloat16))
    engine = Engine(registry, Limits(), dtype=dtype, adapter_memory_bytes=64 << 30,
                    cpu_memory_bytes=64 << 30)
    t0 = time.perf_counter()
    base = registry.get(SYNTHETIC)
    _sync(device)
    embed = base.model.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in base.model.parameters()) - embed
    out["model"] = {"build_s": time.perf_counter() - t0, "params_counted": n_params,
                    "input_embedding": embed, "base_bytes": base.nbytes, "dtype": dtype,
                    "attn": getattr(base.model.config, "_attn_implementation", None)}
    vocab = base.vocab_size
    hp = AdamParams(learning_rate=1e-5)

    sections = {}

    def section(fn):
        """A section of this part: its failure is recorded under its name and the next runs."""
        sections[fn.__name__] = fn
        return fn

    @section
    def train():
        """LoRA training steps: tokens/s and MFU."""
        engine.create_model("train", SYNTHETIC, LoRAConfig(rank=args.rank, alpha=32.0, seed=0))
        out["lora_params"] = engine.models["train"].adapter.num_parameters()
        sizes = {}
        for tokens in args.tokens:
            batch = max(1, tokens // args.seq)
            inp = _input(_random_rows(vocab, batch, args.seq, tokens))
            entry = {"batch": batch, "seq": args.seq, "tokens": batch * args.seq}
            sizes[str(tokens)] = entry
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                times, losses = [], []
                for i in range(args.warmup + args.steps):
                    if i >= args.warmup and times and not time_left(2 * max(times) + 60):
                        entry["stopped_early"] = f"time box: {len(times)} timed steps"
                        break

                    def step(inp=inp, losses=losses):
                        losses.append(engine.forward_backward("train", inp).metrics["loss:sum"])
                        engine.optim_step("train", hp)

                    took = _timed(device, step)
                    if i >= args.warmup:
                        times.append(took)
                entry.update(step_s=times, losses=losses, peak_bytes=_peak(device))
                if times:
                    med = statistics.median(times)
                    flops = 4 * n_params * entry["tokens"]
                    entry.update(step_median_s=med, tokens_per_s=entry["tokens"] / med,
                                 mfu=flops / med / rate)
            except Exception as e:  # out of memory at this size: the next size still runs
                entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if cuda:  # after the except block: the exception no longer holds the pass's tensors
                torch.cuda.empty_cache()
            out["train"] = sizes
        if not any("tokens_per_s" in e for e in sizes.values()):
            raise RuntimeError("no training size was measured")

    @section
    def offload():
        """The trained adapter with its gradients and AdamW moments, GPU -> CPU -> GPU."""
        engine.forward_backward("train", _input(_random_rows(vocab, 1, 64, 1)))  # grads too
        tm = engine.models["train"]

        def everything():  # weights, gradients, AdamW moments and step counts, in order
            state = tm.optimizer.state_dict()["state"]
            return ([t.detach() for t in tm.adapter.parameters()]
                    + [t.grad for t in tm.adapter.parameters()]
                    + [v for i in sorted(state) for _, v in sorted(state[i].items())
                       if isinstance(v, torch.Tensor)])

        before = [t.clone() for t in everything()]
        nbytes = residency.training_bytes(tm.adapter, tm.optimizer)
        home, cpu = tm.adapter.A[next(iter(tm.adapter.A))].device, torch.device("cpu")
        out_s, in_s = [], []
        for _ in range(3):
            out_s.append(_timed(device, lambda: residency.move(tm.adapter, tm.optimizer, cpu)))
            in_s.append(_timed(device, lambda: residency.move(tm.adapter, tm.optimizer, home)))
        after = everything()
        exact = len(after) == len(before) and all(
            a.device == b.device and torch.equal(a, b) for a, b in zip(before, after, strict=True))
        state = [v for s in tm.optimizer.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.ndim]
        exact &= len(state) == 2 * len(tm.adapter.parameters())
        exact &= all(v.device == home for v in state + tm.adapter.parameters())
        out["offload"] = {"rank": args.rank, "bytes": nbytes,
                          "to_cpu_s": statistics.median(out_s),
                          "to_device_s": statistics.median(in_s),
                          "round_trip_s": statistics.median(
                              a + b for a, b in zip(out_s, in_s, strict=True)),
                          "exact": bool(exact), "optimizer_state_tensors": len(state)}

    @section
    def tenants():
        """8 tenants x 1 sequence together (one forward_backward_batch) vs one after another."""
        engine.forget_model("train")
        if cuda:
            torch.cuda.empty_cache()
        ids = [f"tenant-{i}" for i in range(args.tenants)]
        for i, model_id in enumerate(ids):
            engine.create_model(model_id, SYNTHETIC, LoRAConfig(rank=args.rank, alpha=32.0,
                                                                seed=i))
        requests = [(m, _input(_random_rows(vocab, 1, args.tenant_seq, 100 + i)))
                    for i, m in enumerate(ids)]
        results = {}

        def together():
            got = engine.forward_backward_batch(requests)
            bad = [g for g in got if isinstance(g, Exception)]
            if bad:
                raise bad[0]
            results["together"] = [g.metrics["loss:sum"] for g in got]

        def alone():
            results["alone"] = [engine.forward_backward(m, inp).metrics["loss:sum"]
                                for m, inp in requests]

        together(), alone()  # warm-up
        t_together = statistics.median(_timed(device, together) for _ in range(3))
        t_alone = statistics.median(_timed(device, alone) for _ in range(2))
        tokens = args.tenants * args.tenant_seq
        out["tenants"] = {
            "tenants": args.tenants, "seq": args.tenant_seq, "together_s": t_together,
            "alone_s": t_alone, "speedup": t_alone / t_together,
            "together_tokens_per_s": tokens / t_together, "alone_tokens_per_s": tokens / t_alone,
            "loss_rel_max": max(_rel(a, b) for a, b in zip(results["together"],
                                                            results["alone"], strict=True))}
        for model_id in ids:
            engine.forget_model(model_id)
        if cuda:
            torch.cuda.empty_cache()

    @section
    def decode():
        """The engine's decoder against transformers' generate on the same model."""
        import numpy as np

        from tuneforge.engine.sampler import SampleRequest, SamplingParams

        for model_id in list(engine.models):
            engine.forget_model(model_id)
        if cuda:
            torch.cuda.empty_cache()
        engine.add_sampler_for_base("base", SYNTHETIC)
        gen_tokens = args.decode_tokens
        params = SamplingParams(max_tokens=gen_tokens, temperature=0.0)
        results = {}
        out["decode"] = results
        for rows in (1, args.decode_batch):
            if not time_left(30):
                results[str(rows)] = {"error": "time box spent"}
                continue
            prompts = np.random.default_rng(rows).integers(0, min(vocab, 8192),
                                                           (rows, args.prompt)).tolist()
            got: dict = {}

            def engine_decode(prompts=prompts, got=got, params=params):
                if len(prompts) == 1:
                    got["engine"] = [engine.sample("base", SampleRequest(
                        prompt=prompts[0], num_samples=1, params=params)).sequences[0].tokens]
                    return
                for i, prompt in enumerate(prompts):
                    engine.admit(i, "base", SampleRequest(prompt=prompt, num_samples=1,
                                                          params=params))
                done = {}
                while engine.decoding():
                    for handle, result in engine.decode_step():
                        done[handle] = result.sequences[0].tokens
                got["engine"] = [done[i] for i in range(len(prompts))]

            def hf_generate(prompts=prompts, got=got, n=gen_tokens):
                ids = torch.tensor(prompts, device=device)
                autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                          enabled=dtype == "bf16")
                with torch.no_grad(), autocast:
                    seqs = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False, pad_token_id=0)
                got["hf"] = seqs[:, ids.shape[1]:].tolist()

            # warm-up of both, then one timed run of each
            engine_decode(got={}, params=SamplingParams(max_tokens=4, temperature=0.0))
            hf_generate(got={}, n=4)
            t_engine = _timed(device, engine_decode)
            t_hf = _timed(device, hf_generate)
            made, made_hf = sum(map(len, got["engine"])), sum(map(len, got["hf"]))
            agree = sum(a == b for e, h in zip(got["engine"], got["hf"], strict=True)
                        for a, b in zip(e, h, strict=False))
            results[str(rows)] = {
                "rows": rows, "prompt": args.prompt, "new_tokens": gen_tokens,
                "engine_s": t_engine, "hf_s": t_hf, "engine_tokens_per_s": made / t_engine,
                "hf_tokens_per_s": made_hf / t_hf,
                "speedup": (made / t_engine) / (made_hf / t_hf),
                "greedy_tokens_agree": agree / max(made, 1)}
            out["decode"] = results
        if any("error" in d for d in results.values()):
            raise RuntimeError("not every batch size was measured")

    failed = []
    for name, fn in sections.items():
        if not time_left(30):
            out[name] = {**(out.get(name) or {}), "error": "time box spent"}
            failed.append(name)
            continue
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            value = out.get(name)
            if not isinstance(value, dict) or not value:
                value = {}
            out[name] = {**value, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            failed.append(name)
        if cuda:
            torch.cuda.empty_cache()
    out["peak_bytes"] = _peak(device)
    out["failed_sections"] = failed
    out["ok_checks"] = not failed and out.get("offload", {}).get("exact", False)


def run_part(args) -> int:
    out = _Partial(args.result)
    out["part"] = args.part
    try:
        if args.part == "correctness":
            part_correctness(args, out)
        else:
            part_throughput(args, out)
    except BaseException as e:  # reported by the parent, which goes on with the next part
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        return 1
    return 0


# ---- the parent: the table -------------------------------------------------------------------

def _goal(value, goal, smoke: bool) -> str:
    if value is None:
        return "–"
    verdict = "met" if value >= goal else "missed"
    return f"{verdict} (smoke)" if smoke else verdict


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(check, measurement, goal, verdict) for each row of the table."""
    parts, smoke = results["parts"], results["smoke"]
    c, t = parts.get("correctness", {}), parts.get("throughput", {})
    rows = []

    def check(key, label, measure, goal):
        r = c.get(key)
        if r is None:
            planned = "correctness" in results["plan"]
            rows.append((label, c.get("error", "not run")[:70], goal, "FAIL" if planned else "–"))
        else:
            rows.append((label, measure(r), goal, "pass" if r["ok"] else "FAIL"))

    check("lora_vs_peft_bf16", "LoRA vs PEFT, bf16",
          lambda r: f"loss rel {r['loss_rel']:.1e}, logprobs rel {r['logprobs_rel']:.1e} "
                    f"(grads rel {r['grads_rel']:.1e})", f"rel <= {TOL['peft']:g}")
    check("ce_fp32", "CE + LoRA grads fp32 vs f64",
          lambda r: f"loss rel {r['loss_rel']:.1e}, grads max rel {r['grad_max_rel']:.1e}",
          f"loss {TOL['ce_loss']:g}, grads {TOL['ce_grad']:g}")
    check("ce_bf16", "CE + LoRA grads bf16 vs f64",
          lambda r: f"loss rel {r['loss_rel']:.1e}, grads cos {r['grad_cos']:.4f}",
          f"loss {TOL['bf16_loss']:g}, cos >= {TOL['bf16_cos']:g}")
    for dtype in ("fp32", "bf16"):
        check(f"sampler_{dtype}", f"sampler vs trainer, {dtype}",
              lambda r: f"max |dlogprob| {r['max_abs']:.1e} (prompt {r['prompt_max_abs']:.1e}, "
                        f"{r['sampled_tokens']} sampled {r['sampled_max_abs']:.1e})",
              f"<= {TOL[f'sampler_{dtype}']:g}")
    for dtype in ("fp32", "bf16"):
        check(f"lean_{dtype}", f"lean decode vs transformers, {dtype}",
              lambda r: f"{r['tokens']} greedy tokens "
                        f"{'equal' if r['same_tokens'] else 'DIFFER'}, "
                        f"max |dlogprob| {r['max_abs']:.1e}",
              f"same tokens, <= {TOL[f'lean_{dtype}']:g}")
    missing = t.get("error", "not run")[:70]
    m = t.get("matmul")
    def measured(key, field):
        """A section's results where it measured `field`, else None (and its error)."""
        value = t.get(key)
        if isinstance(value, dict) and field in value:
            return value, None
        err = value.get("error") if isinstance(value, dict) else None
        return None, (err or missing)[:70]

    m, err = measured("matmul", "flops_per_s")
    rows.append(("matmul rate", f"{m['flops_per_s'] / 1e12:.1f} TFLOP/s ({m['dtype']}, "
                 f"{m['n']}^3)" if m else err, "–", "measured" if m else "–"))
    mfu_goal = f"MFU >= {GOALS['mfu'] * 100:.0f}%"
    sizes = [e for e in (t.get("train") or {}).values() if isinstance(e, dict)]
    for e in sizes:
        if e.get("tokens_per_s"):
            measure = (f"{e['tokens_per_s']:.0f} tok/s, {e['step_median_s'] * 1e3:.0f} ms/step, "
                       f"MFU {e['mfu'] * 100:.1f}%")
        else:
            measure = e.get("error", "no timed step")[:70]
        rows.append((f"LoRA step {e['batch']}x{e['seq']}", measure, mfu_goal,
                     _goal(e.get("mfu"), GOALS["mfu"], smoke)))
    if not sizes:
        rows.append(("LoRA step", measured("train", "-")[1], mfu_goal, "–"))
    o, err = measured("offload", "round_trip_s")
    trip = "CPU>CPU>CPU" if smoke else "GPU>CPU>GPU"
    rows.append((f"offload r{o['rank']} {trip}" if o else "adapter offload",
                 f"{o['round_trip_s'] * 1e3:.1f} ms ({o['to_cpu_s'] * 1e3:.1f} + "
                 f"{o['to_device_s'] * 1e3:.1f}) for {o['bytes'] / 2**20:.0f} MiB, exact "
                 f"{o['exact']}" if o else err, "–",
                 ("measured" if o["exact"] else "FAIL") if o else "–"))
    n, err = measured("tenants", "speedup")
    rows.append((f"{n['tenants']} tenants x {n['seq']} together" if n else "tenants together",
                 f"{n['speedup']:.2f}x ({n['together_s'] * 1e3:.0f} vs {n['alone_s'] * 1e3:.0f} "
                 f"ms alone; loss rel {n['loss_rel_max']:.0e})" if n else err,
                 f">= {GOALS['tenants']:g}x", _goal(n and n["speedup"], GOALS["tenants"], smoke)))
    decode = t.get("decode") if isinstance(t.get("decode"), dict) else {}
    for key, goal in (("1", "decode_1"), (str(results.get("decode_batch", 64)), "decode_64")):
        d = decode.get(key)
        label = f"decode batch {key} vs generate"
        if isinstance(d, dict) and "speedup" in d:
            rows.append((label, f"{d['speedup']:.2f}x ({d['engine_tokens_per_s']:.0f} vs "
                         f"{d['hf_tokens_per_s']:.0f} tok/s; greedy agree "
                         f"{d['greedy_tokens_agree'] * 100:.0f}%)",
                         f">= {GOALS[goal]:g}x", _goal(d["speedup"], GOALS[goal], smoke)))
        else:
            why = d.get("error") if isinstance(d, dict) else decode.get("error")
            rows.append((label, (why or missing)[:70], f">= {GOALS[goal]:g}x", "–"))
    return rows


def print_table(results: dict) -> None:
    parts = results["parts"]
    c = parts.get("correctness", {})
    t = parts.get("throughput", {})
    model = t.get("model") or {}
    print(f"\n{results['device']}; torch {c.get('torch')} (CUDA {c.get('torch_cuda')}), "
          f"transformers {c.get('transformers')}, peft {c.get('peft')}")
    print(f"correctness: {TINY}, LoRA r8; throughput: {results['model']}, "
          f"{model.get('params_counted', 0) / 1e6:,.1f}M params counted for MFU (4N), "
          f"{model.get('dtype')}, LoRA r{results['rank']} on all linear layers + lm_head")
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in rows + [("check", "measurement", "goal", "verdict")])
              for i in range(3)]
    header = ("check", "measurement", "goal", "verdict")
    for r in [header, tuple("-" * w for w in widths) + ("-------",), *rows]:
        print(f"{r[0]:{widths[0]}s}  {r[1]:{widths[1]}s}  {r[2]:{widths[2]}s}  {r[3]}")
    for name, p in parts.items():
        print(f"[{name}] {p.get('status')} in {p.get('seconds', 0):.0f} s"
              + (f": {p['error'][:200]}" if p.get("error") else ""))


def orchestrate(args) -> int:
    started = time.time()
    out_dir = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        device = "CPU smoke run (tiny Qwen3s, fp32, same code paths)"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu: no CUDA device is visible to torch (torch.cuda.is_available() is False);"
                  " this check needs one GPU. Use --smoke to exercise it on CPU.")
            return 2
        device = f"CUDA: {torch.cuda.get_device_name(0)}"
    plan = args.parts.split(",") if args.parts else list(PARTS)
    for p in plan:
        if p not in PARTS:
            print(f"gpu: unknown part {p!r}; parts: {', '.join(PARTS)}")
            return 2
    results = {"script": "bench/gpu.py", "started": dt.datetime.now(dt.UTC).isoformat(),
               "device": device, "smoke": args.smoke, "plan": plan,
               "model": "2-layer tiny Qwen3 (smoke)" if args.smoke else "Qwen3-8B-shaped, random",
               "tokens_per_step": args.tokens, "seq": args.seq, "rank": args.rank,
               "decode_batch": args.decode_batch, "budget_s": args.budget, "goals": GOALS,
               "tolerances": TOL, "parts": {}}
    json_path, log_path = out_dir / "gpu.json", out_dir / "gpu.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                     "expandable_segments:True"),
           "PYTHONPATH": os.pathsep.join([str(p) for p in (SITE, REPO) if p.is_dir()]
                                         + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with log_path.open("w") as log:
        for name in plan:
            left = args.budget - (time.time() - started)
            box = min(BOXES[name] * args.box_scale, left)
            if box < 20:
                results["parts"][name] = {"status": "skipped", "error": "overall --budget spent"}
                continue
            result_file = out_dir / f".part-{name}.json"
            result_file.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result",
                   str(result_file), "--deadline", str(time.time() + box - 5),
                   *args.forward]
            print(f"[{name}] running (time box {box:.0f} s) ...", flush=True)
            t0 = time.time()
            log.write(f"\n===== {name} =====\n")
            log.flush()
            try:
                code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=box).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            try:
                part = json.loads(result_file.read_text())
                result_file.unlink()
            except (OSError, ValueError):
                part = {}
            part["seconds"] = time.time() - t0
            if code == "timeout":
                part["status"] = "timeout"
                part.setdefault("error", f"ran past its time box of {box:.0f} s")
            elif code != 0:
                part["status"] = "failed"
                part.setdefault("error", f"exit code {code} (crashed; see gpu.log)")
            else:
                part["status"] = "ok" if part.get("ok_checks") else "check!"
            results["parts"][name] = part
            print(f"[{name}] {part['status']} in {part['seconds']:.0f} s", flush=True)
            json_path.write_text(json.dumps(results, indent=1, default=str))
    results["seconds"] = time.time() - started
    results["table"] = [dict(zip(("check", "measurement", "goal", "verdict"), row, strict=True))
                        for row in table_rows(results)]
    json_path.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"results: {json_path}, log: {log_path} ({results['seconds']:.0f} s in all)")
    return 0 if all(results["parts"].get(n, {}).get("status") == "ok" for n in plan) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", "--cpu-smoke", action="store_true",
                    help="run the same parts on CPU with tiny models, fp32, in seconds")
    ap.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 450; 150 with --smoke)")
    ap.add_argument("--box-scale", type=float, default=1.0, help="scale every part's time box")
    ap.add_argument("--tokens", help="tokens per training step, comma-separated "
                    "(default 2048,4096,8192; 128,256 with --smoke)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per training sequence "
                    "(default 2048; 64 with --smoke)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per size (default 5)")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--tenant-seq", type=int, default=None, help="default 512; 64 with --smoke")
    ap.add_argument("--decode-batch", type=int, default=None, help="default 64; 8 with --smoke")
    ap.add_argument("--decode-tokens", type=int, default=None, help="default 128; 8 with --smoke")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; 16)")
    ap.add_argument("--models-dir", default=None,
                    help="where the tiny model is built (default .cache/gpu-models)")
    ap.add_argument("--out", help="folder for gpu.json (default $OUT)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    s = args.smoke
    args.budget = args.budget or (150.0 if s else 450.0)
    args.tokens = [int(x) for x in (args.tokens or ("128,256" if s else "2048,4096,8192")
                                    ).split(",")]
    args.seq = args.seq or (64 if s else 2048)
    args.steps = args.steps or (2 if s else 5)
    args.warmup = min(args.warmup, 1) if s else args.warmup
    args.tenant_seq = args.tenant_seq or (64 if s else 512)
    args.decode_batch = args.decode_batch or (8 if s else 64)
    args.decode_tokens = args.decode_tokens or (8 if s else 128)
    args.prompt = args.prompt or (16 if s else 128)
    args.models_dir = args.models_dir or str(REPO / ".cache" / "gpu-models")
    args.forward = ["--tokens", ",".join(map(str, args.tokens)), "--seq", str(args.seq),
                    "--rank", str(args.rank), "--warmup", str(args.warmup), "--steps",
                    str(args.steps), "--tenants", str(args.tenants), "--tenant-seq",
                    str(args.tenant_seq), "--decode-batch", str(args.decode_batch),
                    "--decode-tokens", str(args.decode_tokens), "--prompt", str(args.prompt),
                    "--models-dir", args.models_dir] + (["--smoke"] if s else [])
    if args.part:
        if s:
            import torch

            torch.set_num_threads(1)
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
