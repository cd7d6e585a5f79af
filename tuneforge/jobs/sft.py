"""Supervised fine-tuning, and prompt distillation (which is SFT on a teacher's answers).

Rows become token sequences with the cookbook's renderers (`build_supervised_example`, the
renderer chosen from the base model) and `conversation_to_datum`; the loss is the server's
`cross_entropy` with per-example mean weights, as in the cookbook's supervised recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinker import types

from tuneforge.jobs import data, evaluate
from tuneforge.jobs.runner import (
    JobContext,
    adam,
    conclude,
    renderer_for,
    train_loop,
)


def train_on_what(name: str):
    from tinker_cookbook.renderers import TrainOnWhat

    return {"last_assistant_message": TrainOnWhat.LAST_ASSISTANT_MESSAGE,
            "all_assistant_messages": TrainOnWhat.ALL_ASSISTANT_MESSAGES,
            "all_messages": TrainOnWhat.ALL_MESSAGES}[name]


def load_split(spec, kind: str) -> tuple[list[dict], list[dict]]:
    examples = data.load_examples(kind, spec.data)
    if spec.eval_data is not None:
        return examples, data.load_examples(kind, spec.eval_data, "eval_data")
    return data.split(examples, spec.eval_split, spec.seed)


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
        batch = [self.datums[i] for i in indices]
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(adam(lr)).result()
        out = fb.result()
        # per-example mean NLL (each example's weights sum to 1)
        return {"loss": out.metrics["loss:sum"] / len(batch), "examples": len(batch)}

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


def run(ctx: JobContext) -> dict:
    train, held_out = load_split(ctx.spec, "sft")
    return train_supervised(ctx, Supervised(ctx, train, held_out, ctx.spec.train_on))


# ---- prompt distillation ------------------------------------------------------------------------


def teacher_context(teacher) -> str | None:
    if teacher.skill_file:
        return Path(teacher.skill_file).read_text()
    return teacher.system_prompt


class Distilled(Supervised):
    """The teacher answers each prompt, with its context (system prompt or SKILL.md) when it has
    one; the student learns those answers from the bare prompt. The teacher must share the
    student's tokenizer (the same base model, or one of its family). The teacher's answers are
    written to teacher_data.jsonl once, so a resumed job trains on the same data."""

    def __init__(self, ctx: JobContext, prompts: list[dict], held_out: list[dict]) -> None:
        super().__init__(ctx, [], [])
        self.prompts, self.held_prompts = prompts, held_out

    def setup(self, tc) -> None:
        name, renderer = renderer_for(self.ctx.spec, tc)
        cache = self.ctx.run.path / "teacher_data.jsonl"
        if cache.exists():
            rows = [json.loads(line) for line in cache.read_text().splitlines()]
        else:
            rows = self._teach(renderer)
            tmp = cache.with_name(".teacher_data.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(cache)
        self.train = [{"messages": r["messages"], "meta": {}} for r in rows if not r["held_out"]]
        self.held_out = [{"messages": r["messages"], "meta": {}} for r in rows if r["held_out"]]
        self.prepare(name, renderer)

    def _teach(self, renderer) -> list[dict]:
        spec = self.ctx.spec
        teacher = spec.teacher
        if teacher.model.startswith("tinker://"):
            sampler = self.ctx.service.create_sampling_client(model_path=teacher.model).result()
        else:
            sampler = self.ctx.service.create_sampling_client(base_model=teacher.model).result()
        context = teacher_context(teacher)
        system = [{"role": "system", "content": context}] if context else []
        params = types.SamplingParams(max_tokens=teacher.max_tokens,
                                      temperature=teacher.temperature, seed=spec.seed,
                                      stop=renderer.get_stop_sequences())
        jobs = [(p, held, sampler.sample(renderer.build_generation_prompt([*system, *p["prompt"]]),
                                         teacher.samples_per_prompt, params))
                for held, group in ((False, self.prompts), (True, self.held_prompts))
                for p in group]
        rows = []
        for p, held, fut in jobs:
            for seq in fut.result().sequences:
                message, _ = renderer.parse_response(seq.tokens)
                answer = evaluate.text_of(message)
                rows.append({"messages": [*p["prompt"], {"role": "assistant",
                                                         "content": answer}],
                             "held_out": held})
        self.ctx.run.log(f"teacher {teacher.model} answered {len(rows)} prompts with its "
                         f"context ({len(context or '')} characters)")
        return rows


def run_distill(ctx: JobContext) -> dict:
    spec = ctx.spec
    prompts, held_out = load_split(spec, "distill")
    sup = Distilled(ctx, prompts, held_out)
    n_train = len(prompts) * spec.teacher.samples_per_prompt
    result = train_loop(ctx, n_train, sup.step, sup.evaluate if held_out else None,
                        setup=sup.setup)
    examples = sup.held_out or sup.train[: max(spec.eval_samples, 1)]

    def base_model_loss(report: dict) -> None:
        # how well the base model (the student before training) matches the teacher
        base = ctx.service.create_sampling_client(base_model=spec.base_model).result()
        report["base_model_loss"] = sup.report(base, examples)["loss"]

    return conclude(ctx, result, sup, examples, bool(sup.held_out), more=base_model_loss)
