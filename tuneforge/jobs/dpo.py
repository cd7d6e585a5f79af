"""Direct Preference Optimization through `forward_backward_custom`, with the cookbook's
`compute_dpo_loss`. The reference model is the base model (its quantized copy when the job trains
on one, so the policy starts at the reference): its log-probabilities of every chosen and
rejected answer are computed once, through a sampling client, before training starts.

`compute_dpo_loss` is a mean over the pairs of its call, so each forward_backward of an
accumulated step scales its loss by its share of the effective batch: the summed gradient is
that of the mean over the whole effective batch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tinker import types

from tuneforge.jobs import data, evaluate
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.jobtype import JobType, PreviewRow
from tuneforge.jobs.loop import adam, conclude, micro_batches, train_loop
from tuneforge.jobs.model import renderer_for, served_base
from tuneforge.jobs.spec import Common, DataSource, option
from tuneforge.jobs.supervised import preview_chat


class DPOSpec(Common):
    """Direct Preference Optimization: the adapter learns to prefer each row's chosen answer
    over its rejected one, against the base model as the reference."""

    type: Literal["dpo"]
    data: DataSource = option(..., "preference rows: a JSONL path or a list of {prompt, chosen,"
                              " rejected} rows", group="data")
    dpo_beta: float = option(0.1, "strength of the preference against the reference model: "
                             "higher keeps closer to the base model", group="dpo", gt=0, le=100)


def preference_chats(ex: dict) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected answer, each as a chat after the prompt."""
    return tuple([*ex["prompt"], {"role": "assistant", "content": a}]
                 for a in (ex["chosen"], ex["rejected"]))


class Preference:
    def __init__(self, ctx: JobContext, train: list[dict], held_out: list[dict]) -> None:
        self.ctx, self.train, self.held_out = ctx, train, held_out
        self.renderer = None
        self.pairs: list[tuple[types.Datum, types.Datum]] = []
        self.eval_pairs: list[tuple[types.Datum, types.Datum]] = []
        self.ref: list[tuple[float, float]] = []
        self.eval_ref: list[tuple[float, float]] = []

    def _pair(self, ex: dict) -> tuple[types.Datum, types.Datum]:
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised.data import conversation_to_datum

        spec = self.ctx.spec
        return tuple(conversation_to_datum(chat, self.renderer, spec.max_length,
                                           TrainOnWhat.LAST_ASSISTANT_MESSAGE, reduction="none")
                     for chat in preference_chats(ex))

    def setup(self, tc) -> None:
        spec = self.ctx.spec
        name, self.renderer = renderer_for(spec, tc)
        self.pairs = [self._pair(ex) for ex in self.train]
        self.eval_pairs = [self._pair(ex) for ex in self.held_out]
        reference = self.ctx.service.create_sampling_client(
            base_model=served_base(spec)).result()
        self.ref = self._reference(reference, self.pairs)
        self.eval_ref = self._reference(reference, self.eval_pairs)
        self.ctx.run.log(f"renderer {name}; {len(self.pairs)} training and "
                         f"{len(self.eval_pairs)} held-out pairs; reference log-probs computed")

    @staticmethod
    def _reference(sampler, pairs) -> list[tuple[float, float]]:
        def full(d: types.Datum) -> types.ModelInput:
            return d.model_input.append_int(int(d.loss_fn_inputs["target_tokens"].tolist()[-1]))

        futures = [(sampler.compute_logprobs(full(c)), sampler.compute_logprobs(full(r)))
                   for c, r in pairs]
        out = []
        for (c, r), (fc, fr) in zip(pairs, futures, strict=True):
            out.append(tuple(_weighted(fut.result()[1:], d) for d, fut in ((c, fc), (r, fr))))
        return out

    def _loss(self, refs, share: float = 1.0):
        """The DPO loss of these pairs, times `share` (their fraction of the step's pairs); the
        metrics stay those of these pairs alone."""
        beta = self.ctx.spec.dpo_beta

        def loss_fn(data, logprobs_list):
            from tinker_cookbook.preference.train_dpo import compute_dpo_loss

            weights = [torch.tensor(d.loss_fn_inputs["weights"].tolist()) for d in data]
            sums = [(lp * w).sum() for lp, w in zip(logprobs_list, weights, strict=True)]
            loss, metrics = compute_dpo_loss(sums[0::2], sums[1::2],
                                             [torch.tensor(c) for c, _ in refs],
                                             [torch.tensor(r) for _, r in refs], beta)
            return loss * share, metrics
        return loss_fn

    def step(self, tc, indices: list[int], lr: float) -> dict:
        calls = []
        for batch in micro_batches(self.ctx.spec, indices):
            data = [d for i in batch for d in self.pairs[i]]
            loss_fn = self._loss([self.ref[i] for i in batch], len(batch) / len(indices))
            calls.append((len(batch), tc.forward_backward_custom(data, loss_fn)))
        tc.optim_step(adam(self.ctx.spec, lr)).result()
        done = [(n, fut.result().metrics) for n, fut in calls]
        # each call's metrics are means over its pairs: weigh them by their pairs
        return {name: sum(n * m[key] for n, m in done) / len(indices)
                for name, key in (("loss", "dpo_loss"), ("accuracy", "accuracy"),
                                  ("margin", "margin"))}

    def scores(self, sampler, pairs, refs) -> dict:
        """DPO loss, preference accuracy and margin of the weights behind `sampler`."""
        from tinker_cookbook.preference.train_dpo import compute_dpo_loss

        policy = self._reference(sampler, pairs)
        loss, m = compute_dpo_loss([torch.tensor(c) for c, _ in policy],
                                   [torch.tensor(r) for _, r in policy],
                                   [torch.tensor(c) for c, _ in refs],
                                   [torch.tensor(r) for _, r in refs], self.ctx.spec.dpo_beta)
        return {"loss": float(loss), "accuracy": m["accuracy"], "margin": m["margin"]}

    def evaluate(self, tc) -> dict:
        s = self.scores(tc.save_weights_and_get_sampling_client().result(), self.eval_pairs,
                        self.eval_ref)
        return {"eval_loss": s["loss"], "eval_accuracy": s["accuracy"],
                "eval_margin": s["margin"]}

    def report(self, sampler, examples: list[dict]) -> dict:
        spec = self.ctx.spec
        pairs = [self._pair(ex) for ex in examples]
        reference = self.ctx.service.create_sampling_client(
            base_model=served_base(spec)).result()
        report = {"examples": len(pairs),
                  **self.scores(sampler, pairs, self._reference(reference, pairs))}
        shown = examples[: spec.eval_samples]
        outputs = evaluate.generate(sampler, self.renderer, [ex["prompt"] for ex in shown],
                                    spec.eval_max_tokens)
        report["samples"] = [{"prompt": ex["prompt"][-1]["content"], "chosen": ex["chosen"],
                              "rejected": ex["rejected"], "output": o}
                             for ex, o in zip(shown, outputs, strict=True)]
        return report


def _weighted(logprobs, datum: types.Datum) -> float:
    weights = datum.loss_fn_inputs["weights"].tolist()
    return float(sum(w * lp for w, lp in zip(weights, logprobs, strict=True) if w))


class DPO(JobType):
    name = "dpo"
    spec = DPOSpec

    def parse_row(self, row: dict) -> dict:
        return data.dpo_example(row)

    def run(self, ctx: JobContext) -> dict:
        train, held_out = self.split(ctx.spec)
        pref = Preference(ctx, train, held_out)
        result = train_loop(ctx, len(train), pref.step, pref.evaluate if held_out else None,
                            setup=pref.setup)
        return conclude(ctx, result, pref, held_out or train, bool(held_out))

    def evaluator(self, ctx: JobContext, folder: Path, data_source):
        return Preference(ctx, [], []), self.eval_examples(ctx.spec, data_source)

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        """Two rows per pair: the chosen answer, then the rejected one."""
        examples = self.examples(spec.data)
        rows = []
        for i, ex in enumerate(examples[:limit]):
            for side, chat in zip(("chosen", "rejected"), preference_chats(ex), strict=True):
                tokens, weights, _ = preview_chat(renderer, chat, "last_assistant_message")
                rows.append((tokens, weights, {"pair": i, "side": side}))
        return rows, len(examples)
