"""A job's rows as it trains on them, token by token, before (or while) it runs.

Each row goes through the job type's own path (its renderer, `build_supervised_example` with
its `train_on`, its cut at `max_length`) and comes back as

    {"tokens": [{"id", "text", "weight"}], "n_tokens", "n_trained", "truncated", "cut_tokens",
     "max_length", ...fields of the type (dpo: "pair", "side"; atomic: "task"; rl: "answer")}

`tokens` are the tokens the job keeps (after the cut at max_length; `cut_tokens` were dropped,
`truncated` says whether any were), `text` each token decoded alone, `weight` its loss weight
(0: context only). A job whose prompts are sampled (rl) or written by the teacher (distill) shows
its prompts with weight 0; a running or finished distillation job shows the teacher's answers.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.jobs.model import pick_renderer
from tuneforge.jobs.registry import job_type

MAX_PREVIEW_ROWS = 100


def preview(spec, tokenizer, folder: Path | None = None, limit: int = 20) -> dict:
    """The first `limit` rows of `spec`'s data (`folder`: the job's experiment folder, for what
    it wrote itself), rendered with `tokenizer` (the caller's own: it is not thread-safe)."""
    kind = job_type(spec.type)
    _, renderer = pick_renderer(spec.renderer, spec.base_model, tokenizer)
    rows, total = kind.preview(spec, renderer, folder, limit)
    examples = []
    for tokens, weights, extra in rows:
        extra = dict(extra)
        max_length = extra.pop("max_length", spec.max_length) if kind.cuts_at_max_length else None
        kept = tokens[:max_length] if max_length is not None else tokens
        examples.append({
            "tokens": [{"id": t, "text": tokenizer.decode([t]), "weight": w}
                       for t, w in zip(kept, weights, strict=False)],
            "n_tokens": len(kept), "n_trained": sum(1 for w in weights[:len(kept)] if w > 0),
            "truncated": len(kept) < len(tokens), "cut_tokens": len(tokens) - len(kept),
            "max_length": max_length, **extra})
    return {"examples": examples, "total_examples": total}
