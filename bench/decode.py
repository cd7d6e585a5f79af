"""Decoding speed of the engine's decoder against `transformers` `generate`, engine-direct.

Everything runs in this process (no HTTP), on the base model as the engine loads it (through
ModelRegistry), greedy, a fixed number of new tokens (no stop), medians of interleaved repeats
after one warm-up round:
  batch 1     one request: the lean decoding forward (engine/fast_decode.py), the reference
              transformers forward of the same decoder (`lean=False`), and `model.generate` on
              the same weights; in bf16 `generate` runs twice: under the same autocast as the
              engine (fp32 weights) and on a copy of the model loaded in bf16
  batch 64    64 requests (different prompts of the same length) admitted together and decoded
              to the end, lean and reference, in tokens/s against `generate` of one request
The goals: batch 1 lean / generate >= 1.5, batch 64 lean / generate >= 5 (against the fp32
`generate` in fp32; in bf16 against each `generate`, both shown). It also prints the floor: the
sum of the time of every linear layer's matrix-vector product for one token (`F.linear` on the
model's weights, and in the form the lean path uses), which bounds a batch-1 step from below.

    python bench/decode.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--dtype fp32|bf16|both]
                           [--prompt 32] [--tokens 64] [--batch 64] [--repeats 3] [--threads 1]
                           [--record]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import MODELS_DIR, median, record, timed

GOAL_ONE, GOAL_MANY = 1.5, 5.0


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every linear layer a token goes through (the base layer of each LoRA wrapper)."""
    from tuneforge.engine.lora import LoRALinear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out.append(m.base)
        elif isinstance(m, torch.nn.Linear) and not name.endswith(".base"):
            out.append(m)
    return out


def floor_ms(base, lean, dtype: str, repeats: int = 5) -> tuple[float, float]:
    """Per token: (sum of F.linear matvecs over the model's weights [in bf16: bf16 copies],
    the lean path's products without LoRA)."""
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    weights = [lin.weight.detach().to(cast) for lin in linears(base.model)]
    xs = [torch.randn(1, w.shape[1], dtype=cast) for w in weights]
    plain = [timed(lambda: [F.linear(x, w) for x, w in zip(xs, weights, strict=True)])
             for _ in range(repeats)]
    groups = [w for layer in lean.layers for w in layer.weights()] + [lean.lm_head]
    ins = [torch.randn(1, 1, g.in_features) for g in groups]
    with lean.autocast(), torch.no_grad():
        lean_t = [timed(lambda: [g(x, None) for g, x in zip(groups, ins, strict=True)])
                  for _ in range(repeats)]
    return median(plain) * 1000, median(lean_t) * 1000


def measure(args, dtype: str, base, hf, hf_bf16, reqs) -> dict:
    """Interleaved timings of every side in `dtype`; tokens/s, the floor, the weight copies."""
    from tuneforge.engine import decoder, fast_decode

    lean = fast_decode.lean_model(base.model, dtype)
    if lean is None:
        raise SystemExit(f"{args.model}: no lean path ({fast_decode.unsupported(base.model)})")
    hf_input = torch.tensor([reqs[0].prompt])

    def one(lean_on: bool) -> None:
        out = decoder.sample_alone(base, None, reqs[0], dtype, lean=lean_on)
        assert len(out.sequences[0].tokens) == args.tokens

    def many(lean_on: bool) -> None:
        dec = decoder.Decoder(base, dtype, max_rows=args.batch, lean=lean_on)
        for i, r in enumerate(reqs):
            dec.admit(i, None, r)
        done = 0
        while dec.pending:
            done += len(dec.step())
        assert done == args.batch

    def generate(model, autocast: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.generate(hf_input, max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.tokens

    sides = {"lean 1": lambda: one(True), "reference 1": lambda: one(False),
             "generate": lambda: generate(hf, dtype == "bf16")}
    if hf_bf16 is not None:
        sides["generate bf16 weights"] = lambda: generate(hf_bf16, False)
    sides["lean N"] = lambda: many(True)
    sides["reference N"] = lambda: many(False)
    times = {name: [] for name in sides}
    for r in range(args.repeats + 1):
        for name, fn in sides.items():
            t = timed(fn)
            if r:
                times[name].append(t)
    linear_ms, lean_linear_ms = floor_ms(base, lean, dtype)
    rows = {name: args.batch if name.endswith(" N") else 1 for name in sides}
    return {"tps": {name: rows[name] * args.tokens / median(ts) for name, ts in times.items()},
            "linear_ms": linear_ms, "lean_linear_ms": lean_linear_ms,
            "copies_mib": lean.copied_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="both", choices=("fp32", "bf16", "both"))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.models import ModelRegistry
    from tuneforge.engine.sampler import SampleRequest, SamplingParams

    torch.set_num_threads(args.threads)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    folder = ModelRegistry(MODELS_DIR, torch.device("cpu")).resolve(args.model)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    vocab = hf.get_output_embeddings().weight.shape[0]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, stop_token_ids=frozenset())
    reqs = [SampleRequest(prompt=rng.integers(0, vocab, args.prompt).tolist(), num_samples=1,
                          params=params) for _ in range(args.batch)]
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    results = {}
    for dtype in dtypes:
        # the base as the engine loads it for `dtype` (bf16: linear weights stored in bf16)
        base = ModelRegistry(MODELS_DIR, torch.device("cpu"), dtype=dtype).get(args.model)
        hf_bf16 = (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
                   if dtype == "bf16" else None)
        results[dtype] = measure(args, dtype, base, hf, hf_bf16, reqs)
        del base, hf_bf16

    n = args.batch
    print(f"\n{args.model}: prompt {args.prompt}, {args.tokens} new tokens, greedy, "
          f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats")
    print(f"{'dtype':5s} {'side':24s} {'tokens/s':>9s} {'ms/step':>9s} {'/ generate':>11s}")
    rows = []
    for dtype, res in results.items():
        tps = res["tps"]
        refs = [r for r in ("generate", "generate bf16 weights") if r in tps]
        for name, value in tps.items():
            label = name.replace(" N", f" x{n}").replace(" 1", " x1")
            per_row = 1000 * (n if name.endswith(" N") else 1) / value
            print(f"{dtype:5s} {label:24s} {value:9.1f} {per_row:9.1f} "
                  f"{value / tps['generate']:10.2f}x")
        print(f"{dtype:5s} floor: linear products {res['lean_linear_ms']:.1f} ms/token (lean), "
              f"{res['linear_ms']:.1f} ms/token (F.linear); lean weight copies "
              f"{res['copies_mib']:.0f} MiB")
        for ref in refs:
            one, many = tps["lean 1"] / tps[ref], tps["lean N"] / tps[ref]
            print(f"{dtype:5s} goals vs {ref}: batch 1 {one:.2f}x "
                  f"({'met' if one >= GOAL_ONE else 'missed'}, >= {GOAL_ONE}), batch {n} "
                  f"{many:.1f}x ({'met' if many >= GOAL_MANY else 'missed'}, >= {GOAL_MANY})")
        rows.append(
            f"{args.model} | {dtype}, {args.prompt}+{args.tokens} tokens, batch {n}, "
            f"{args.threads} thr | {tps['lean 1']:.1f} / {tps['reference 1']:.1f} / "
            + " / ".join(f"{tps[r]:.1f}" for r in refs)
            + f" | {tps['lean N']:.0f} / {tps['reference N']:.0f} | "
            + " / ".join(f"{tps['lean 1'] / tps[r]:.2f}" for r in refs) + " | "
            + " / ".join(f"{tps['lean N'] / tps[r]:.1f}" for r in refs)
            + f" | {1000 / tps['lean 1']:.1f} / {res['lean_linear_ms']:.1f} / "
            f"{res['linear_ms']:.1f}")
    if args.record:
        for row in rows:
            record("decode", row)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
