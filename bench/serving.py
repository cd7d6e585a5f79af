"""Serving through the OpenAI-compatible API: live streams batched together, time to first
token, and the endpoint's cost over a Tinker `sample` of the same request.

Measured side by side in one run, medians over interleaved repeats after a warm-up, all with the
official `openai` client on `/oai/api/v1/completions` (token-id prompts, so every side decodes
exactly the same tokens), greedy, `--tokens` new tokens at most (EOS may end one earlier, the
same on every side; tokens/s counts what was generated):
  concurrent  eight streaming requests (`stream: true`) at the same time, one client each
  one-by-one  the same eight streams, one after another
  endpoint    one non-streaming request
  stream      one streaming request
  tinker      the same request as a Tinker SDK `sample` (base-model sampler)
Prints tokens/s, time to first token (one-by-one streams, and the slowest of the concurrent
ones), the ratio concurrent/one-by-one (goal >= 3) and the endpoint's overhead over the Tinker
`sample` (endpoint/tinker - 1 and stream/tinker - 1; goal <= 5%).

    python bench/serving.py [--model tuneforge/tiny-qwen3-l] [--clients 8] [--tokens 64]
                            [--prompt 32] [--repeats 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import median, record, run_all, start_server, timed


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
    import openai
    import tinker
    from tinker import types

    vocab = 8192 if args.model.startswith("tuneforge/") else 49152
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, args.prompt).tolist() for _ in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), args.model, args.threads)
        try:
            base_url = f"{server.base_url}/oai/api/v1"
            clients = [openai.OpenAI(base_url=base_url, api_key=server.api_key, max_retries=0)
                       for _ in range(args.clients)]
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            sampler = sc.create_sampling_client(base_model=args.model).result()
            params = types.SamplingParams(max_tokens=args.tokens, temperature=0.0)
            generated: dict[str, list[int]] = {}

            def stream(i: int) -> tuple[float, int]:
                """(time to first token, tokens) of one streamed completion."""
                t0, first, out = time.perf_counter(), None, None
                for chunk in clients[i].completions.create(
                        model=args.model, prompt=prompts[i], max_tokens=args.tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True}):
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    out = chunk.usage or out
                return first, out.completion_tokens

            def concurrent():
                generated["concurrent"] = run_all([lambda i=i: stream(i)
                                                   for i in range(args.clients)])

            def one_by_one():
                generated["one-by-one"] = [stream(i) for i in range(args.clients)]

            def endpoint():
                out = clients[0].completions.create(model=args.model, prompt=prompts[0],
                                                    max_tokens=args.tokens, temperature=0)
                generated["endpoint"] = [(None, out.usage.completion_tokens)]

            def single_stream():
                generated["stream"] = [stream(0)]

            def tinker_sample():
                out = sampler.sample(types.ModelInput.from_ints(prompts[0]), 1, params).result()
                generated["tinker"] = [(None, len(out.sequences[0].tokens))]

            sides = {"concurrent": concurrent, "one-by-one": one_by_one, "endpoint": endpoint,
                     "stream": single_stream, "tinker": tinker_sample}
            times = {name: [] for name in sides}
            ttft = {"one-by-one": [], "concurrent": []}
            for r in range(args.repeats + 1):
                for name, fn in sides.items():
                    t = timed(fn)
                    if r:
                        times[name].append(t)
                        if name in ttft:
                            ttft[name].append(max(f for f, _ in generated[name]))
            tokens = {name: sum(n for _, n in generated[name]) for name in sides}
        finally:
            server.stop()
    assert tokens["concurrent"] == tokens["one-by-one"], tokens
    assert tokens["endpoint"] == tokens["stream"] == tokens["tinker"], tokens
    tps = {name: tokens[name] / median(ts) for name, ts in times.items()}
    print(f"model {args.model}, prompt {args.prompt} tokens, up to {args.tokens} new tokens, "
          f"greedy, {args.clients} OpenAI clients, {args.threads} thread(s)")
    for name in sides:
        print(f"  {name:10s} {median(times[name]):7.3f} s   {tps[name]:8.0f} tokens/s "
              f"({tokens[name]} tokens)")
    batching = tps["concurrent"] / tps["one-by-one"]
    over = median(times["endpoint"]) / median(times["tinker"]) - 1
    over_stream = median(times["stream"]) / median(times["tinker"]) - 1
    first_one, first_all = median(ttft["one-by-one"]) * 1000, median(ttft["concurrent"]) * 1000
    print(f"time to first token: {first_one:.0f} ms one by one (slowest of {args.clients}), "
          f"{first_all:.0f} ms slowest of {args.clients} concurrent")
    print(f"concurrent / one-by-one   = {batching:.2f}   (goal >= 3)")
    print(f"endpoint / tinker - 1     = {over * 100:+.1f}%   (goal <= 5%)")
    print(f"stream / tinker - 1       = {over_stream * 100:+.1f}%")
    if args.record:
        record("serving", f"{args.model} | {args.clients} streams, {args.prompt}+{args.tokens} "
               f"tokens, {args.threads} thr | {tps['concurrent']:.0f} / {tps['one-by-one']:.0f} "
               f"| {batching:.2f} | {first_one:.0f} / {first_all:.0f} ms | "
               f"{over * 100:+.1f}% / {over_stream * 100:+.1f}%")


if __name__ == "__main__":
    main()
