"""Supervised learning on chats, shared by the job types that train with cross-entropy (sft,
distill, an atomic batch's tasks).

Rows become token sequences with the cookbook's renderers (`build_supervised_example`, the
renderer chosen from the base model) and `conversation_to_datum`; the loss is the server's
`cross_entropy` with per-example mean weights, as in the cookbook's supervised recipes. The
server sums the loss over examples (no per-batch normalisation), so the forward_backward calls of
an accumulated step add up to exactly the gradient of one call over the effective batch.
"""

from __future__ import annotations

from tinker import types

from tuneforge.jobs import evaluate
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.jobtype import PreviewRow
from tuneforge.jobs.loop import adam, conclude, micro_batches, train_loop
from tuneforge.jobs.model import renderer_for


def train_on_what(name: str):
    from tinker_cookbook.renderers import TrainOnWhat

    return {"last_assistant_message": TrainOnWhat.LAST_ASSISTANT_MESSAGE,
            "all_assistant_messages": TrainOnWhat.ALL_ASSISTANT_MESSAGES,
            "all_messages": TrainOnWhat.ALL_MESSAGES}[name]


def preview_chat(renderer, messages: list[dict], train_on: str) -> PreviewRow:
    """A chat's tokens and loss weights as `conversation_to_datum` builds them (before its cut
    at max_length and its shift by one)."""
    model_input, weights = renderer.build_supervised_example(
        messages, train_on_what=train_on_what(train_on))
    return model_input.to_ints(), [float(w) for w in weights.tolist()], {}


class Supervised:
    """Datums for a list of chats, built once the tokenizer is known."""

    def __init__(self, ctx: JobContext, train: list[dict], held_out: list[dict],
                 train_on: str = "last_assistant_message") -> None:
        self.ctx, self.train, self.held_out = ctx, train, held_out
        self.train_on = train_on_what(train_on)
        self.renderer = None
        self.datums: list[types.Datum] = []
        self.eval_datums: list[types.Datum] = []

    def setup(self, tc) -> None:
        self.prepare(*renderer_for(self.ctx.spec, tc))

    def prepare(self, name: str, renderer) -> None:
        from tinker_cookbook.supervised.data import conversation_to_datum

        spec = self.ctx.spec
        self.renderer = renderer
        self.ctx.run.log(f"renderer {name}; {len(self.train)} training and "
                         f"{len(self.held_out)} held-out examples")
        self.datums = [conversation_to_datum(ex["messages"], self.renderer, spec.max_length,
                                             self.train_on, reduction="mean")
                       for ex in self.train]
        self.eval_datums = [conversation_to_datum(ex["messages"], self.renderer,
                                                  spec.max_length, self.train_on,
                                                  reduction="none")
                            for ex in self.held_out]

    def step(self, tc, indices: list[int], lr: float) -> dict:
        batches = micro_batches(self.ctx.spec, [self.datums[i] for i in indices])
        futures = [tc.forward_backward(batch, "cross_entropy") for batch in batches]
        tc.optim_step(adam(self.ctx.spec, lr)).result()
        total = sum(fut.result().metrics["loss:sum"] for fut in futures)
        # per-example mean NLL (each example's weights sum to 1)
        return {"loss": total / len(indices), "examples": len(indices)}

    def evaluate(self, tc) -> dict:
        out = tc.forward(self.eval_datums, "cross_entropy").result()
        weight = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in self.eval_datums)
        return {"eval_loss": out.metrics["loss:sum"] / weight}

    def report(self, sampler, examples: list[dict]) -> dict:
        spec = self.ctx.spec
        return evaluate.sft_report(sampler, self.renderer, examples, self.train_on,
                                   spec.max_length, spec.eval_max_tokens, spec.eval_samples)


def train_supervised(ctx: JobContext, sup: Supervised, tag: str = "") -> dict:
    spec = ctx.spec
    result = train_loop(ctx, len(sup.train), sup.step,
                        sup.evaluate if sup.held_out else None, setup=sup.setup, tag=tag)
    out = conclude(ctx, result, sup, sup.held_out or sup.train[: max(spec.eval_samples, 1)],
                   bool(sup.held_out))
    ctx.run.log(f"{tag}done: {result.steps} steps, train loss {out['first_train_loss']:.4f} -> "
                f"{out['last_train_loss']:.4f}, {out['eval']['split']} loss "
                f"{out['eval']['loss']:.4f}")
    return {**out, "best_eval_loss": result.best_eval,
            "examples": len(sup.train) + len(sup.held_out)}
