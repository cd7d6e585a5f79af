"""QLoRA on one GPU: bf16 LoRA vs NF4 QLoRA at 8B scale, and the dense-twin exactness check.

A prepared check for one CUDA GPU (an H200) without network, through tuneforge's engine
(`Engine.forward_backward` with sum cross-entropy + `optim_step`, LoRA on every linear layer and
`lm_head`). Parts, each in its own subprocess with its own time box; a part that fails or runs
out of time is reported and the next one runs:

  env              versions, the GPU, the bitsandbytes library; an NF4 round trip and a 4-bit
                   matmul against the dense one on the device
  twin             `tuneforge/tiny-qwen3@nf4` loaded exactly as served (transformers'
                   BitsAndBytesConfig, NF4, double quantization, fp32 compute, on the GPU) vs its
                   dense twin (`quantized.dequantize`: every 4-bit layer an `nn.Linear` holding
                   its dequantized fp32 weight), same adapter seed, fp32, TF32 off: loss and every
                   LoRA gradient of two steps (the second after an AdamW step, so lora_A's
                   gradients are non-zero too) within 1e-5 relative, with and without gradient
                   checkpointing; and the quantize-by-replacement used for the 8B model below
                   gives bit-identical packed weights and statistics to the served loading
  lora-bf16        a random Qwen3-8B-shaped model (hidden 4096, 36 layers, 32 heads, 8 KV heads,
                   intermediate 12288, vocab 151936, untied lm_head) built in GPU memory from its
                   config (no checkpoint, no download), bf16 weights, bf16 autocast: bf16 LoRA
  qlora-bf16       the same with every decoder linear layer NF4 (double quantization, bf16
                   compute), embeddings, norms and lm_head bf16: QLoRA as torchtune runs it
  *-ckpt           both with gradient checkpointing (torchtune's recipes checkpoint by default)
  qlora-served     an `@nf4` base as tuneforge serves it: NF4 linears, fp32 embeddings / norms /
                   lm_head, bf16 compute (`--dtype auto` on CUDA)
  lora-served      a plain base as tuneforge serves it: fp32 weights, bf16 autocast

The 8B bases are quantized by replacing each `nn.Linear` (except `lm_head`) with a
`bnb.nn.Linear4bit` built with the arguments transformers' bitsandbytes integration uses, its
weight quantized on the GPU by `Params4bit(...).to(device)`: what `from_pretrained` with that
config does per layer, without writing 16 GB to disk and reading it back (the twin part checks
the two give identical layers). The models reach the engine through a ModelRegistry whose
`load_copy` returns the built model (`lora.inject`, checkpointing, passes and the optimizer are
the engine's own). Per 8B part: warm-up steps, then timed steps (CUDA synchronised; median),
tokens/s, and `torch.cuda.max_memory_allocated` over the steps (model, adapter, AdamW state,
activations; reset after the build), beside the anchor ratios (torchtune on a 4090: QLoRA at
about 0.78x the tokens/s of bf16 LoRA at about 0.46x the memory).

    bash bench/gpu_setup.sh install && python3 bench/gpu_qlora.py [--budget 330] [--parts ...]
    python bench/gpu_qlora.py --cpu-smoke        # the same code paths on a tiny model, on CPU
    python bench/gpu_qlora.py --record-from results.json   # here: append its row to RESULTS.md

Prints one table; writes `gpu_qlora.json` (and `gpu_qlora.log`, the parts' output) under $OUT
when that is set, or under --out.
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
for p in (SITE, REPO):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ANCHOR = {"tokens_per_s": 0.78, "memory": 0.46}  # QLoRA / bf16 LoRA, torchtune on a 4090
TOLERANCE = 1e-5

# name: (quantized linears, weights dtype of everything else, gradient checkpointing)
TRAIN_PARTS = {
    "lora-bf16": (False, "bf16", False),
    "qlora-bf16": (True, "bf16", False),
    "qlora-bf16-ckpt": (True, "bf16", True),
    "lora-bf16-ckpt": (False, "bf16", True),
    "qlora-served": (True, "fp32", False),
    "lora-served": (False, "fp32", False),
}
PARTS = ("env", "twin", *TRAIN_PARTS)
# Seconds each part may take at most (imports and the model build included).
BOXES = {"env": 90, "twin": 150, **dict.fromkeys(TRAIN_PARTS, 120)}

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, tie_word_embeddings=False,
                rms_norm_eps=1e-6)
SMOKE = dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6)
SYNTHETIC = "random/qwen3-8b"


# ---- shared pieces (run inside the parts) --------------------------------------------------------

def _device(args):
    import torch

    return torch.device("cpu" if args.cpu_smoke else "cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _strict_fp32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _tiny_folder(args) -> Path:
    """The built-in tiny model's folder (built on first use): its tokenizer serves the 8B too."""
    import torch

    from tuneforge.engine.models import ModelRegistry

    return ModelRegistry(Path(args.models_dir), torch.device("cpu")).resolve("tuneforge/tiny-qwen3")


def _datums(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    from tuneforge.engine.types import Datum, ForwardBackwardInput

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1))
    return ForwardBackwardInput(
        data=[Datum(tokens=t[:-1].astype(np.int64),
                    inputs={"target_tokens": t[1:].astype(np.int64)}) for t in tokens],
        loss_fn="cross_entropy")


def quantize_linears(model, compute_dtype, skip=("lm_head",)) -> int:
    """Replace every `nn.Linear` but `skip` by an NF4 `bnb.nn.Linear4bit` (double quantization),
    quantized where its weight lies, with the arguments transformers' bitsandbytes integration
    uses (`replace_with_bnb_linear`, then `Params4bit(value, **old.__dict__).to(device)`)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    count = 0
    paths = [path for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and path.rpartition(".")[2] not in skip]
    for path in paths:  # one at a time: each dense weight is freed once its layer is replaced
        module = model.get_submodule(path)
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                compute_dtype, compress_statistics=True, quant_type="nf4",
                                quant_storage=torch.uint8, device="meta")
        w = module.weight.data
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, **new.weight.__dict__).to(w.device)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        if hasattr(new, "support_avx512bf16_for_cpu"):  # as quantized.load does
            new.support_avx512bf16_for_cpu = False
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        del module, w
        count += 1
    return count


def build_random(spec: dict, weights_dtype, device, quantize: bool, compute_dtype):
    """A random-initialised Qwen3 of `spec` built directly on `device` (no checkpoint)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**spec)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with torch.no_grad():  # explicit: no parameter left uninitialised, whatever transformers does
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError(f"buffer {name} is not finite after the build")
    if quantize:
        quantize_linears(model, compute_dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model


def in_memory_registry(models_dir: Path, device, dtype: str, tokenizer_dir: Path, name: str,
                       build):
    """A ModelRegistry that serves `name` (and its quantized forms) from `build()`, a model
    built in memory, with the tokenizer of `tokenizer_dir`; every other name as usual."""
    from tuneforge.engine.models import ModelRegistry

    class InMemoryRegistry(ModelRegistry):
        def resolve(self, served):
            return tokenizer_dir if self.spec(served).model == name else super().resolve(served)

        def load_copy(self, served):
            if self.spec(served).model != name:
                return super().load_copy(served)
            model = build()
            model.eval()
            model.requires_grad_(False)
            return model

    return InMemoryRegistry(models_dir, device, dtype=dtype)


class _Partial:
    """A part's results, rewritten to its JSON file as they grow (a timed-out part keeps them)."""

    def __init__(self, path: str) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def update(self, **kw) -> None:
        for k, v in kw.items():
            self[k] = v


def _rss(field: str) -> int:
    """CPU smoke runs: bytes of a /proc/self/status field (VmRSS, VmHWM), in place of CUDA's
    allocator statistics."""
    import re

    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) << 10 if m else 0


def _reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---- parts ---------------------------------------------------------------------------------

def part_env(args, out: _Partial) -> None:
    import torch

    out.update(python=sys.version.split()[0], torch=torch.__version__,
               torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    import transformers

    out["transformers"] = transformers.__version__
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    import pydantic
    import pydantic_settings

    out.update(pydantic=pydantic.__version__, pydantic_settings=pydantic_settings.__version__)
    import tuneforge.engine.engine  # noqa: F401  (the engine imports: settings, storage, ...)
    from tuneforge.engine import hardware

    device = _device(args)
    out["auto_dtype"] = list(hardware.choose_dtype("auto", device))
    import bitsandbytes as bnb

    out["bitsandbytes"] = bnb.__version__
    try:
        from bitsandbytes import cextension

        lib = getattr(cextension, "lib", None)
        out["bnb_library"] = str(getattr(lib, "_name", None) or getattr(
            getattr(lib, "lib", None), "_name", None) or type(lib).__name__)
    except Exception as e:  # diagnostics only
        out["bnb_library"] = f"unknown ({type(e).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    # NF4 round trip and the 4-bit matmul (what Linear4bit runs in training) on the device.
    n = 1024 if args.cpu_smoke else 4096
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    w = torch.randn(n, n, device=device, generator=gen) * 0.02
    q, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    wd = bnb.functional.dequantize_4bit(q, state).float()
    out["nf4_roundtrip_rel_err"] = float((wd - w).norm() / w.norm())
    x = torch.randn(256, n, device=device, generator=gen)
    y = bnb.matmul_4bit(x, q.t(), quant_state=state)
    out["matmul_4bit_vs_dense_rel"] = float((y.float() - x @ wd.t()).norm() / (x @ wd.t()).norm())
    out["ok_checks"] = out["nf4_roundtrip_rel_err"] < 0.2 and out["matmul_4bit_vs_dense_rel"] < 1e-3


def part_twin(args, out: _Partial) -> None:
    import torch

    from tuneforge.engine import quantized
    from tuneforge.engine.engine import Engine
    from tuneforge.engine.lora import LoRAConfig
    from tuneforge.engine.models import ModelRegistry
    from tuneforge.engine.optim import AdamParams
    from tuneforge.settings import Limits

    _strict_fp32()
    device = _device(args)
    models_dir = Path(args.models_dir)
    name = "tuneforge/tiny-qwen3@nf4"

    class TwinRegistry(ModelRegistry):
        def load_copy(self, name):  # the served copy, every 4-bit layer made dense
            return quantized.dequantize(super().load_copy(name))

    served_reg = ModelRegistry(models_dir, device, dtype="fp32")
    twin_reg = TwinRegistry(models_dir, device, dtype="fp32")
    served = Engine(served_reg, Limits(), dtype="fp32")
    twin = Engine(twin_reg, Limits(), dtype="fp32")
    base = served_reg.get(name)
    out.update(quantized_layers=len(quantized.quantized_layers(base.model)),
               twin_quantized_layers=len(quantized.quantized_layers(twin_reg.get(name).model)))
    inp = _datums(base.vocab_size, 4, 64)
    hp = AdamParams(learning_rate=1e-3)
    worst = {"loss": 0.0, "grad": 0.0}
    for ckpt in (False, True):
        rid = f"run-ckpt{int(ckpt)}"
        for eng in (served, twin):
            eng.create_model(rid, name, LoRAConfig(rank=8, alpha=32.0, seed=0),
                             gradient_checkpointing=ckpt)
        for step in range(2):
            got = []
            for eng in (served, twin):
                loss = eng.forward_backward(rid, inp).metrics["loss:sum"]
                grads = [p.grad.detach().double().cpu().clone() for p in
                         eng.models[rid].adapter.parameters()]
                eng.optim_step(rid, hp)
                got.append((loss, grads))
            (lq, gq), (ld, gd) = got
            loss_rel = abs(lq - ld) / max(abs(ld), 1e-30)
            grad_rel = max(float((a - b).norm() / max(float(b.norm()), 1e-30))
                           for a, b in zip(gq, gd, strict=True) if float(b.norm()) > 0)
            nonzero = sum(float(b.norm()) > 0 for b in gd)
            out[f"ckpt{int(ckpt)}_step{step}"] = {"loss_served": lq, "loss_twin": ld,
                                                  "loss_rel": loss_rel, "grad_rel_max": grad_rel,
                                                  "nonzero_grads": nonzero, "grads": len(gd)}
            worst["loss"] = max(worst["loss"], loss_rel)
            worst["grad"] = max(worst["grad"], grad_rel)
    out.update(loss_rel_max=worst["loss"], grad_rel_max=worst["grad"])
    # The 8B parts quantize by replacement: it must give the served layers bit for bit.
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(served_reg.resolve(name)),
                                                 dtype=torch.float32).to(device)
    quantize_linears(dense, torch.float32)
    mine, theirs = quantized.quantized_layers(dense), quantized.quantized_layers(base.model)
    same = len(mine) == len(theirs)
    for (_, a), (_, b) in zip(mine, theirs, strict=False):
        sa, sb = a.weight.quant_state, b.weight.quant_state
        same &= torch.equal(a.weight.data, b.weight.data) and torch.equal(sa.absmax, sb.absmax)
        same &= sa.blocksize == sb.blocksize and sa.quant_type == sb.quant_type
        same &= sa.dtype == sb.dtype and bool(sa.nested) == bool(sb.nested)
        if sa.nested and sb.nested:
            same &= torch.equal(sa.state2.absmax, sb.state2.absmax) and torch.equal(
                sa.offset, sb.offset)
    out["replacement_matches_served"] = bool(same)
    out["ok_checks"] = (worst["loss"] <= TOLERANCE and worst["grad"] <= TOLERANCE and bool(same)
                        and out["twin_quantized_layers"] == 0)


def part_train(args, config: str, out: _Partial) -> None:
    import torch

    from tuneforge.engine.engine import Engine
    from tuneforge.engine.lora import LoRAConfig
    from tuneforge.engine.optim import AdamParams
    from tuneforge.settings import Limits

    quantize, weights, ckpt = TRAIN_PARTS[config]
    device = _device(args)
    cuda = device.type == "cuda"
    spec = SMOKE if args.cpu_smoke else QWEN3_8B
    weights_dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    name = SYNTHETIC + ("@nf4" if quantize else "")
    tokenizer_dir = _tiny_folder(args)

    registry = in_memory_registry(
        Path(args.models_dir), device, "bf16", tokenizer_dir, SYNTHETIC,
        lambda: build_random(spec, weights_dtype, device, quantize, torch.bfloat16))
    engine = Engine(registry, Limits(), dtype="bf16", adapter_memory_bytes=64 << 30)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base = registry.get(name)
    _sync(device)
    out.update(build_s=time.perf_counter() - t0, base_bytes=base.nbytes,
               quantization=base.quantization, weights=weights, checkpointing=ckpt,
               attn=getattr(base.model.config, "_attn_implementation", None),
               tokens_per_step=args.batch * args.seq, batch=args.batch, seq=args.seq,
               rank=args.rank)
    if cuda:
        out["build_peak_bytes"] = torch.cuda.max_memory_allocated()
    engine.create_model("run", name, LoRAConfig(rank=args.rank, alpha=32.0, seed=0),
                        gradient_checkpointing=ckpt)
    out["lora_params"] = engine.models["run"].adapter.num_parameters()
    inp = _datums(base.vocab_size, args.batch, args.seq)
    hp = AdamParams(learning_rate=1e-5)
    if cuda:
        torch.cuda.empty_cache()
        out["resident_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # smoke run: process RSS stands in for the allocator's statistics
        out["resident_bytes"] = _rss("VmRSS")
        _reset_rss_peak()
    deadline = args.deadline
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i >= args.warmup and times and time.time() + 2 * max(times) > deadline:
            out["stopped_early"] = f"time box: {len(times)} timed steps"
            break
        _sync(device)
        t0 = time.perf_counter()
        losses.append(engine.forward_backward("run", inp).metrics["loss:sum"])
        engine.optim_step("run", hp)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        else:
            out["warmup_s"] = out.data.get("warmup_s", []) + [time.perf_counter() - t0]
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:
            out["peak_bytes"] = _rss("VmHWM")
        out.update(step_s=times, losses=losses)
    if times:
        med = statistics.median(times)
        out.update(step_median_s=med, tokens_per_s=args.batch * args.seq / med)
    out["ok_checks"] = bool(times) and all(map(_finite, losses))


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def run_part(args) -> int:
    out = _Partial(args.result)
    out["part"] = args.part
    try:
        if args.part == "env":
            part_env(args, out)
        elif args.part == "twin":
            part_twin(args, out)
        else:
            part_train(args, args.part, out)
    except BaseException as e:  # reported by the parent, which goes on with the next part
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        return 1
    return 0


# ---- the parent ----------------------------------------------------------------------------

def _fmt_bytes(b) -> str:
    return "–" if b is None else f"{b / 2**30:.2f}"


def summarize(parts: dict) -> dict:
    def ratio(a, b, key):
        pa, pb = parts.get(a, {}), parts.get(b, {})
        if pa.get(key) is None or pb.get(key) is None:
            return None
        return pa[key] / pb[key]

    s = {}
    for q, lo, label in (("qlora-bf16", "lora-bf16", "bf16"),
                        ("qlora-bf16-ckpt", "lora-bf16-ckpt", "bf16_ckpt"),
                        ("qlora-served", "lora-served", "served"),
                        ("qlora-served", "lora-bf16", "served_vs_bf16")):
        s[f"tokens_per_s_{label}"] = ratio(q, lo, "tokens_per_s")
        s[f"memory_{label}"] = ratio(q, lo, "peak_bytes")
    s["ckpt_memory_qlora"] = ratio("qlora-bf16-ckpt", "qlora-bf16", "peak_bytes")
    s["ckpt_tokens_per_s_qlora"] = ratio("qlora-bf16-ckpt", "qlora-bf16", "tokens_per_s")
    twin = parts.get("twin", {})
    s["twin_pass"] = twin.get("ok_checks") if "error" not in twin else False
    return s


def print_table(results: dict) -> None:
    parts, s = results["parts"], results["summary"]
    env = parts.get("env", {})
    print(f"\n{results['device']}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
          f"transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')} "
          f"({env.get('bnb_library')}); --dtype auto: {env.get('auto_dtype')}")
    print(f"model: {results['model']}; {results['tokens_per_step']} tokens per step "
          f"({results['batch']}x{results['seq']}), LoRA rank {results['rank']} on all linear "
          "layers + lm_head, engine forward_backward + optim_step")
    print(f"{'part':16s} {'status':8s} {'tokens/s':>9s} {'step ms':>8s} {'peak GiB':>9s} "
          f"{'resident':>9s} {'build s':>8s}  notes")
    for name in results["plan"]:
        p = parts.get(name, {})
        status = p.get("status", "–")
        note = (p.get("error") or "")[:90]
        if name == "env" and "error" not in p:
            note = (f"{env.get('gpu', 'CPU')}; nf4 round trip "
                    f"{env.get('nf4_roundtrip_rel_err', 0):.3f}, matmul_4bit vs dense "
                    f"{env.get('matmul_4bit_vs_dense_rel', 0):.1e}")
        if name == "twin" and "loss_rel_max" in p:
            note = (f"loss rel {p['loss_rel_max']:.1e}, LoRA grads rel {p['grad_rel_max']:.1e} "
                    f"(<= {TOLERANCE:g}), replacement == served "
                    f"{p.get('replacement_matches_served')}: "
                    f"{'PASS' if p.get('ok_checks') else 'FAIL'}")
        if name in TRAIN_PARTS and "error" not in p and p.get("losses"):
            note = f"loss {p['losses'][0]:.0f} -> {p['losses'][-1]:.0f}"
            note += f"; {p['stopped_early']}" if p.get("stopped_early") else ""
        tps = f"{p['tokens_per_s']:.0f}" if p.get("tokens_per_s") else "–"
        ms = f"{p['step_median_s'] * 1e3:.0f}" if p.get("step_median_s") else "–"
        build = f"{p['build_s']:.0f}" if p.get("build_s") is not None else "–"
        print(f"{name:16s} {status:8s} {tps:>9s} {ms:>8s} {_fmt_bytes(p.get('peak_bytes')):>9s} "
              f"{_fmt_bytes(p.get('resident_bytes')):>9s} {build:>8s}  {note}")

    def r(x):
        return "–" if x is None else f"{x:.2f}"

    print(f"QLoRA / LoRA          tokens/s  memory   (anchor: torchtune on a 4090: "
          f"{ANCHOR['tokens_per_s']:.2f}  {ANCHOR['memory']:.2f})")
    for label, key in (("bf16 weights", "bf16"), ("bf16 + checkpointing", "bf16_ckpt"),
                       ("as served (fp32 rest)", "served"),
                       ("served nf4 / bf16 LoRA", "served_vs_bf16")):
        print(f"  {label:22s} {r(s[f'tokens_per_s_{key}']):>6s}  {r(s[f'memory_{key}']):>6s}")
    print(f"checkpointing on QLoRA: memory {r(s['ckpt_memory_qlora'])}x, tokens/s "
          f"{r(s['ckpt_tokens_per_s_qlora'])}x; dense twin exact: {s['twin_pass']}")


def orchestrate(args) -> int:
    started = time.time()
    out_dir = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-qlora-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke:
        try:
            import torch
        except ImportError as e:
            print(f"gpu_qlora: torch cannot be imported ({e}); nothing to run")
            return 2
        if not torch.cuda.is_available():
            print("gpu_qlora: no CUDA device is visible to torch (torch.cuda.is_available() is "
                  "False); this check needs one GPU. Use --cpu-smoke to exercise it on CPU.")
            return 2
        device = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        device = "CPU smoke run (tiny Qwen3, same code paths)"
    plan = [p for p in (args.parts.split(",") if args.parts else PARTS)]
    for p in plan:
        if p not in PARTS:
            print(f"gpu_qlora: unknown part {p!r}; parts: {', '.join(PARTS)}")
            return 2
    results = {"script": "bench/gpu_qlora.py", "started": dt.datetime.now(dt.UTC).isoformat(),
               "device": device, "cpu_smoke": args.cpu_smoke, "plan": plan,
               "model": "tiny Qwen3 (smoke)" if args.cpu_smoke else "Qwen3-8B-shaped, random",
               "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
               "rank": args.rank, "budget_s": args.budget, "parts": {}}
    json_path, log_path = out_dir / "gpu_qlora.json", out_dir / "gpu_qlora.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                     "expandable_segments:True"),
           "PYTHONPATH": os.pathsep.join([str(p) for p in (SITE, REPO) if p.is_dir()]
                                         + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log = log_path.open("w")
    for name in plan:
        left = args.budget - (time.time() - started)
        box = min(BOXES[name] * (0.5 if args.cpu_smoke else 1.0) * args.box_scale, left)
        if box < 20:
            results["parts"][name] = {"status": "skipped", "error": "overall --budget spent"}
            print(f"[{name}] skipped: overall budget spent", flush=True)
            continue
        result_file = out_dir / f".part-{name}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result",
               str(result_file), "--batch", str(args.batch), "--seq", str(args.seq),
               "--rank", str(args.rank), "--warmup", str(args.warmup), "--steps",
               str(args.steps), "--models-dir", args.models_dir,
               "--deadline", str(time.time() + box - 5)]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        print(f"[{name}] running (time box {box:.0f} s) ...", flush=True)
        t0 = time.time()
        log.write(f"\n===== {name} =====\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=box)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        log.flush()
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
            part.setdefault("error", f"exit code {code} (crashed; see gpu_qlora.log)")
        else:
            part["status"] = "ok" if part.get("ok_checks", True) else "check!"
        results["parts"][name] = part
        msg = part.get("error") or ""
        print(f"[{name}] {part['status']} in {part['seconds']:.0f} s {msg[:300]}", flush=True)
        if part["status"] in ("failed", "timeout") and part.get("traceback"):
            print("    " + part["traceback"].strip().splitlines()[-1][:300], flush=True)
        results["summary"] = summarize(results["parts"])
        json_path.write_text(json.dumps(results, indent=1, default=str))
    log.close()
    results["summary"] = summarize(results["parts"])
    results["seconds"] = time.time() - started
    json_path.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"results: {json_path}, log: {log_path} ({results['seconds']:.0f} s in all)")
    failed = [n for n, p in results["parts"].items() if p.get("status") != "ok"]
    return 1 if failed else 0


def record_from(path: str) -> None:
    """Append the row of a results JSON (copied back from the GPU machine) to RESULTS.md."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import record

    results = json.loads(Path(path).read_text())
    parts, s = results["parts"], results.get("summary") or summarize(results["parts"])

    def r(x):
        return "–" if x is None else f"{x:.2f}"

    def tps(n):
        return f"{parts[n]['tokens_per_s']:.0f}" if parts.get(n, {}).get("tokens_per_s") else "–"

    def gib(n):
        b = parts.get(n, {}).get("peak_bytes")
        return "–" if b is None else f"{b / 2**30:.1f}"

    twin = parts.get("twin", {})
    twin_txt = ("–" if "loss_rel_max" not in twin else
                f"{'pass' if twin.get('ok_checks') else 'FAIL'} (loss {twin['loss_rel_max']:.0e}, "
                f"grads {twin['grad_rel_max']:.0e})")
    env = parts.get("env", {})
    record("gpu_qlora", " | ".join([
        f"{env.get('gpu', results['device'])}, torch {env.get('torch')}, "
        f"bnb {env.get('bitsandbytes')}",
        f"{results['model']}, {results['batch']}x{results['seq']}, r{results['rank']}",
        f"{tps('lora-bf16')} / {tps('qlora-bf16')} ({gib('lora-bf16')} / {gib('qlora-bf16')} GiB)",
        f"{r(s['tokens_per_s_bf16'])} / {r(s['memory_bf16'])}",
        f"{r(s['tokens_per_s_bf16_ckpt'])} / {r(s['memory_bf16_ckpt'])}",
        f"{r(s['tokens_per_s_served'])} / {r(s['memory_served'])}",
        twin_txt]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", "--dry-run", action="store_true",
                    help="run the same parts on CPU with a tiny model, in seconds")
    ap.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 330; 240 with --cpu-smoke)")
    ap.add_argument("--box-scale", type=float, default=1.0, help="scale every part's time box")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per training part")
    ap.add_argument("--models-dir", default=None,
                    help="where the tiny model is built (default .cache/gpu-models)")
    ap.add_argument("--out", help="folder for gpu_qlora.json (default $OUT)")
    ap.add_argument("--record-from", metavar="JSON", help="append a results file's row to "
                    "bench/RESULTS.md and exit (run here, not on the GPU machine)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record_from:
        record_from(args.record_from)
        return 0
    args.budget = args.budget or (240.0 if args.cpu_smoke else 330.0)
    args.batch = args.batch or 2
    args.seq = args.seq or (64 if args.cpu_smoke else 2048)
    args.models_dir = args.models_dir or str(REPO / ".cache" / "gpu-models")
    if args.part:
        if args.cpu_smoke:
            import torch

            torch.set_num_threads(1)
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
