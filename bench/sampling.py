"""Sampling throughput: continuous batching across clients and adapters, and one request vs HF.

Measured side by side in one run, medians over interleaved repeats after a warm-up:
  concurrent  eight sampling clients (each on its own adapter) request at the same time
  one-by-one  the same eight requests, one after another
  single      one request through the SDK (base-model sampler)
  hf          `model.generate` of transformers in this process, same base model, same prompt
All decode greedily a fixed number of new tokens (no stop), so every side generates the same
amount. Prints tokens/s and the ratios concurrent/one-by-one (goal >= 3) and single/hf
(goal >= 1.5, HTTP included; bench/decode.py measures the decoder alone), and how long new weights
take to become sampleable against a training step.

    python bench/sampling.py [--model tuneforge/tiny-qwen3-l] [--clients 8] [--tokens 64]
                             [--prompt 32] [--repeats 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import MODELS_DIR, median, record, run_all, start_server, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3-l")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import tinker
    from tinker import types
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt).tolist()
    params = types.SamplingParams(max_tokens=args.tokens, temperature=0.0, stop=[])
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), args.model, args.threads)
        try:
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            samplers = []
            for i in range(args.clients):
                tc = sc.create_lora_training_client(base_model=args.model, rank=8,
                                                    seed=i).result()
                samplers.append(tc.save_weights_and_get_sampling_client().result())
            base = sc.create_sampling_client(base_model=args.model).result()
            model_input = types.ModelInput.from_ints(prompt)
            folder = MODELS_DIR / args.model.replace("/", "--")
            hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
            hf_input = torch.tensor([prompt])

            def draw(s):
                out = s.sample(model_input, 1, params).result()
                assert len(out.sequences[0].tokens) == args.tokens

            def concurrent():
                run_all([lambda s=s: draw(s) for s in samplers])

            def one_by_one():
                for s in samplers:
                    draw(s)

            def single():
                draw(base)

            def hf_generate():
                with torch.no_grad():
                    out = hf.generate(hf_input, max_new_tokens=args.tokens, min_new_tokens=
                                      args.tokens, do_sample=False, pad_token_id=0)
                assert out.shape[1] == args.prompt + args.tokens

            # how soon new weights are sampleable, against one training step of the same client
            tc = sc.create_lora_training_client(base_model=args.model, rank=8, seed=99).result()
            train = [types.Datum(model_input=model_input,
                                 loss_fn_inputs={"target_tokens": np.array(prompt[1:] + [0])})]
            visible, stepped = [], []
            for _ in range(5):
                stepped.append(timed(lambda: (tc.forward_backward(train, "cross_entropy"),
                                              tc.optim_step(types.AdamParams()).result())))
                visible.append(timed(lambda: tc.save_weights_and_get_sampling_client().result()))

            sides = {"concurrent": concurrent, "one-by-one": one_by_one, "single": single,
                     "hf": hf_generate}
            times = {name: [] for name in sides}
            for r in range(args.repeats + 1):
                for name, fn in sides.items():
                    t = timed(fn)
                    if r:
                        times[name].append(t)
        finally:
            server.stop()
    n = {"concurrent": args.clients, "one-by-one": args.clients, "single": 1, "hf": 1}
    tps = {name: n[name] * args.tokens / median(ts) for name, ts in times.items()}
    print(f"model {args.model}, prompt {args.prompt} tokens, {args.tokens} new tokens, greedy, "
          f"{args.clients} clients (rank-8 adapters), {args.threads} thread(s)")
    for name in sides:
        print(f"  {name:10s} {median(times[name]):7.2f} s   {tps[name]:8.0f} tokens/s")
    batching, vs_hf = tps["concurrent"] / tps["one-by-one"], tps["single"] / tps["hf"]
    print(f"new weights sampleable after {median(visible) * 1000:.0f} ms "
          f"(save_weights_and_get_sampling_client) vs {median(stepped) * 1000:.0f} ms for one "
          f"training step of 1x{args.prompt} tokens")
    print(f"concurrent / one-by-one = {batching:.2f}   (goal >= 3)")
    print(f"single / hf generate    = {vs_hf:.2f}   (goal >= 1.5)")
    if args.record:
        record("sampling", f"{args.model} | {args.clients} clients, {args.prompt}+{args.tokens} "
               f"tokens, {args.threads} thr | {tps['concurrent']:.0f} / {tps['one-by-one']:.0f} "
               f"/ {tps['single']:.0f} / {tps['hf']:.0f} | {batching:.2f} | {vs_hf:.2f}")


if __name__ == "__main__":
    main()
