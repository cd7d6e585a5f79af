"""Evaluation: held-out loss and perplexity, exact match, BLEU / ROUGE, graded accuracy, samples,
and a comparison table against a baseline (the base model or another job).

Everything is computed through a `tinker.SamplingClient`: per-token log-probabilities with
`compute_logprobs`, answers with greedy `sample`. BLEU is sacreBLEU's corpus BLEU, ROUGE is
Google's `rouge-score` (F-measures, stemmed).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

from tinker import types


def token_nll(sampler, examples: list[tuple[list[int], list[float]]]) -> dict:
    """Per-token mean negative log-likelihood over the weighted tokens, and its perplexity.
    `examples` are (tokens, weights) with weights aligned to tokens (weight i scores token i
    given tokens[:i])."""
    futures = [sampler.compute_logprobs(types.ModelInput.from_ints(tokens))
               for tokens, _ in examples]
    total, weight = 0.0, 0.0
    for (_tokens, weights), fut in zip(examples, futures, strict=True):
        logprobs = fut.result()
        for w, lp in zip(weights, logprobs, strict=True):
            if w and lp is not None:
                total -= w * lp
                weight += w
    loss = total / weight if weight else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(weight)}


def generate(sampler, renderer, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers to chat prompts, parsed by the renderer."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                  stop=renderer.get_stop_sequences())
    futures = [sampler.sample(renderer.build_generation_prompt(p), 1, params) for p in prompts]
    out = []
    for fut in futures:
        tokens = fut.result().sequences[0].tokens
        message, _ = renderer.parse_response(tokens)
        out.append(text_of(message))
    return out


def text_of(message) -> str:
    content = message.get("content", "") if isinstance(message, dict) else str(message)
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


@functools.cache
def _bleu():
    """One BLEU scorer for the process: sacrebleu caches the tokenizers of every scorer it
    makes (`corpus_bleu` makes one per call), so one per evaluation would pile up."""
    from sacrebleu.metrics import BLEU

    return BLEU()


def text_scores(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    n = max(len(predictions), 1)
    return {
        "exact_match": sum(normalize(p) == normalize(r)
                           for p, r in zip(predictions, references, strict=True)) / n,
        "bleu": _bleu().corpus_score(predictions, [references]).score,
        "rouge1": sum(s["rouge1"].fmeasure for s in rouge) / n,
        "rougeL": sum(s["rougeL"].fmeasure for s in rouge) / n,
    }


def sft_report(sampler, renderer, examples: list[dict], train_on, max_length: int,
               max_tokens: int, n_samples: int) -> dict:
    """Held-out loss/perplexity on the trained tokens; greedy answers to the prompts (everything
    before the last assistant message) scored against that message."""
    scored = []
    for ex in examples:
        model_input, weights = renderer.build_supervised_example(ex["messages"],
                                                                 train_on_what=train_on)
        tokens = model_input.to_ints()[:max_length]
        scored.append((tokens, [float(w) for w in weights.tolist()[:len(tokens)]]))
    report = dict(token_nll(sampler, scored))
    prompts, refs = [], []
    for ex in examples:
        msgs = ex["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
        refs.append(msgs[last]["content"])
    preds = generate(sampler, renderer, prompts, max_tokens)
    report.update(text_scores(preds, refs))
    report["examples"] = len(examples)
    report["samples"] = [{"prompt": p[-1]["content"] if p else "", "reference": r, "output": o,
                          **({"meta": ex["meta"]} if ex.get("meta") else {})}
                         for p, r, o, ex in zip(prompts, refs, preds, examples, strict=True)
                         ][:n_samples]
    return report


def graded_report(sampler, renderer, examples: list[dict], grade: Callable[[str, str], float],
                  max_tokens: int, n_samples: int) -> dict:
    """Greedy answers graded against each row's answer: mean reward and accuracy (reward >= 1)."""
    preds = generate(sampler, renderer, [ex["prompt"] for ex in examples], max_tokens)
    rewards = [grade(p, ex["answer"]) for p, ex in zip(preds, examples, strict=True)]
    n = max(len(examples), 1)
    return {"examples": len(examples), "reward": sum(rewards) / n,
            "accuracy": sum(r >= 1.0 for r in rewards) / n,
            "samples": [{"prompt": ex["prompt"][-1]["content"], "answer": ex["answer"],
                         "output": p, "reward": r}
                        for ex, p, r in zip(examples, preds, rewards, strict=True)][:n_samples]}


def compare(job: dict, baseline: dict, job_name: str, baseline_name: str) -> list[dict]:
    """One table: each numeric metric of the two reports side by side, with the difference."""
    rows = []
    for key, value in job.items():
        other = baseline.get(key)
        if isinstance(value, (int, float)) and isinstance(other, (int, float)) and key not in (
                "examples", "tokens"):
            rows.append({"metric": key, job_name: value, baseline_name: other,
                         "delta": value - other})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing to compare)"
    cols = list(rows[0])
    cells = [[c for c in cols]] + [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
                     for row in cells)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
