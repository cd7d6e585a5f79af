"""Prompt distillation: SFT on a teacher's answers.

The teacher answers each prompt with its context (a system prompt, or a SKILL.md given as one);
the student learns those answers from the bare prompt. The teacher must share the student's
tokenizer (the same base model, or one of its family). The teacher's answers are written to
teacher_data.jsonl once, so a resumed job trains on the same data.

With no `data`, the prompts come from the teacher too (a SKILL.md alone is enough): asked, with
the skill as its system prompt, to write one request the skill covers, it is sampled
`generate_prompts` times (at temperature 1, for variety); the requests are stripped, empty ones
dropped and repeats removed, and the missing ones sampled again, at most `GENERATE_ROUNDS`
rounds (then the job goes on with the distinct requests it has, and says so in its log). They
are written to generated_prompts.jsonl and answered as above. A job with `data` does not also
generate prompts (`generate_prompts` is refused there): its prompts are the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from tinker import types

from tuneforge.errors import UserError
from tuneforge.jobs import data, evaluate
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.jobtype import JobType, PreviewRow
from tuneforge.jobs.loop import conclude, train_loop
from tuneforge.jobs.model import renderer_for, served_base
from tuneforge.jobs.spec import Common, DataSource, OptionError, Strict, option, resolve_path
from tuneforge.jobs.supervised import Supervised, preview_chat

DEFAULT_GENERATED_PROMPTS = 16
GENERATE_ROUNDS = 4
PROMPT_TEMPERATURE = 1.0
REQUEST_INSTRUCTION = ("Write one request that a user could send you and that the instructions "
                       "above cover. Reply with the request only, exactly as the user would "
                       "write it.")


class Teacher(Strict):
    model: str = option(..., "the teacher: a base model name, or a tinker:// sampler-weights "
                        "path", group="teacher", min_length=1)
    base_model: str | None = option(None, "the checkpoint's base model (for a tinker:// "
                                    "teacher)", group="teacher")
    system_prompt: str | None = option(None, "the context the teacher answers with (e.g. the "
                                       "text of a SKILL.md) and the student learns to do "
                                       "without", group="teacher")
    skill_file: str | None = option(None, "a file (e.g. SKILL.md) given to the teacher as its "
                                    "system prompt", group="teacher")
    temperature: float = option(0.7, "sampling temperature of the teacher's answers",
                                group="teacher", ge=0, le=2.0)
    max_tokens: int = option(128, "tokens per teacher answer (and per generated request)",
                             group="teacher", ge=1, le=4096)
    samples_per_prompt: int = option(1, "teacher answers per prompt (each one a training row)",
                                     group="teacher", ge=1, le=16)

    @model_validator(mode="after")
    def _context(self):
        if self.system_prompt is not None and self.skill_file is not None:
            raise OptionError("skill_file", "give system_prompt or skill_file, not both")
        return self


class DistillSpec(Common):
    """Prompt distillation: a teacher answers with a system prompt or a SKILL.md as its context;
    the student learns those answers from the bare prompt. Without data the teacher first
    writes the prompts from its skill."""

    type: Literal["distill"]
    data: DataSource | None = option(
        None, "prompts: a JSONL path or a list of {prompt} rows; leave out to have the teacher "
        "write generate_prompts requests from its system prompt or skill file", group="data")
    generate_prompts: int | None = option(
        None, "without data: how many distinct requests the teacher writes from its skill "
        f"(default {DEFAULT_GENERATED_PROMPTS}); not allowed with data", group="data", ge=1,
        le=256)
    teacher: Teacher = option(..., "the model whose answers the student learns",
                              group="teacher")

    @model_validator(mode="after")
    def _prompt_source(self):
        if self.data is not None:
            if self.generate_prompts is not None:
                raise OptionError("generate_prompts", "give data or generate_prompts, not both "
                                  "(the teacher writes prompts only when there is no data)")
        else:
            if self.teacher.system_prompt is None and self.teacher.skill_file is None:
                raise OptionError("data", "data is required unless the teacher has a "
                                  "system_prompt or skill_file to write prompts from")
            if self.generate_prompts is None:
                self.generate_prompts = DEFAULT_GENERATED_PROMPTS
        return self


def teacher_context(teacher) -> str | None:
    if teacher.skill_file:
        return Path(teacher.skill_file).read_text()
    return teacher.system_prompt


def teacher_sampler(ctx: JobContext):
    teacher = ctx.spec.teacher
    if teacher.model.startswith("tinker://"):
        return ctx.service.create_sampling_client(model_path=teacher.model).result()
    return ctx.service.create_sampling_client(base_model=teacher.model).result()


def _texts(renderer, sequences) -> list[str]:
    return [evaluate.text_of(renderer.parse_response(s.tokens)[0]).strip() for s in sequences]


def generate_requests(ctx: JobContext, sampler, renderer) -> list[dict]:
    """`generate_prompts` distinct user requests written by the teacher from its context, as
    {"prompt"} rows (see the module docstring)."""
    spec = ctx.spec
    want = spec.generate_prompts
    messages = [{"role": "system", "content": teacher_context(spec.teacher)},
                {"role": "user", "content": REQUEST_INSTRUCTION}]
    prompt = renderer.build_generation_prompt(messages)
    seen, requests = set(), []
    for round_no in range(GENERATE_ROUNDS):
        ctx.check_cancel()
        params = types.SamplingParams(max_tokens=spec.teacher.max_tokens,
                                      temperature=PROMPT_TEMPERATURE,
                                      seed=spec.seed * 1_000_003 + round_no,
                                      stop=renderer.get_stop_sequences())
        answer = sampler.sample(prompt, want - len(requests), params).result()
        for text in _texts(renderer, answer.sequences):
            key = evaluate.normalize(text)
            if key and key not in seen:
                seen.add(key)
                requests.append({"prompt": text})
        if len(requests) >= want:
            break
    if not requests:
        raise UserError(f"generate_prompts: the teacher {spec.teacher.model} wrote no request "
                        f"in {GENERATE_ROUNDS} rounds of sampling; give data (prompt rows)")
    note = "" if len(requests) == want else f" (of {want} asked, after {GENERATE_ROUNDS} rounds)"
    ctx.run.log(f"teacher {spec.teacher.model} wrote {len(requests)} distinct requests from "
                f"its context{note}")
    return requests


class Distilled(Supervised):
    """Supervised learning on the teacher's answers (written once to teacher_data.jsonl). The
    prompts, and so the training rows, are known once the tokenizer is (the teacher may have to
    write the prompts first)."""

    def __init__(self, ctx: JobContext, prompts: Callable[[object], list[dict]]) -> None:
        """`prompts(renderer)` gives the prompt rows (held-out ones included, unless eval_data
        has them)."""
        super().__init__(ctx, [], [])
        self.make_prompts = prompts
        self.prompts: list[dict] = []
        self.held_prompts: list[dict] = []

    def setup(self, tc) -> None:
        spec = self.ctx.spec
        name, renderer = renderer_for(spec, tc)
        examples = self.make_prompts(renderer)
        if spec.eval_data is not None:
            self.prompts = examples
            self.held_prompts = [data.prompt_example(row)
                                 for row in data.read_rows(spec.eval_data, "eval_data")]
        else:
            self.prompts, self.held_prompts = data.split(examples, spec.eval_split, spec.seed)
        rows = self.ctx.run.rows("teacher_data.jsonl")
        if not (self.ctx.run.path / "teacher_data.jsonl").exists():
            rows = self._teach(renderer)
            self.ctx.run.write_rows("teacher_data.jsonl", rows)
        self.train = [{"messages": r["messages"], "meta": {}} for r in rows if not r["held_out"]]
        self.held_out = [{"messages": r["messages"], "meta": {}} for r in rows if r["held_out"]]
        self.prepare(name, renderer)

    def _teach(self, renderer) -> list[dict]:
        spec = self.ctx.spec
        teacher = spec.teacher
        sampler = teacher_sampler(self.ctx)
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


class Distill(JobType):
    name = "distill"
    spec = DistillSpec

    def parse_row(self, row: dict) -> dict:
        return data.prompt_example(row)

    def preflight(self, spec) -> None:
        super().preflight(spec)
        if spec.teacher.skill_file and not Path(spec.teacher.skill_file).is_file():
            raise UserError(f"teacher.skill_file: no such file {spec.teacher.skill_file}",
                            fields=[{"field": "teacher.skill_file", "message": "no such file"}])

    def named_files(self, spec) -> list[tuple[str, str]]:
        out = super().named_files(spec)
        if spec.teacher.skill_file:
            out.append(("teacher.skill_file", spec.teacher.skill_file))
        return out

    def resolve_paths(self, spec, base_dir: Path):
        spec = super().resolve_paths(spec, base_dir)
        if spec.teacher.skill_file:
            spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(
                update={"skill_file": resolve_path(spec.teacher.skill_file, base_dir)})})
        return spec

    def inline(self, spec):
        spec = super().inline(spec)
        if spec.teacher.skill_file:
            spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={
                "skill_file": None, "system_prompt": Path(spec.teacher.skill_file).read_text()})})
        return spec

    def prompts(self, ctx: JobContext, renderer) -> list[dict]:
        """The prompt rows: the data's, else the teacher's own (written once)."""
        spec = ctx.spec
        if spec.data is not None:
            return self.examples(spec.data)
        if not (ctx.run.path / "generated_prompts.jsonl").exists():
            rows = generate_requests(ctx, teacher_sampler(ctx), renderer)
            ctx.run.write_rows("generated_prompts.jsonl", rows)
        return self.examples(ctx.run.rows("generated_prompts.jsonl"), "generated prompts")

    def run(self, ctx: JobContext) -> dict:
        spec = ctx.spec
        sup = Distilled(ctx, lambda renderer: self.prompts(ctx, renderer))
        evaluated = bool(spec.eval_split) or spec.eval_data is not None
        result = train_loop(ctx, lambda: len(sup.train), sup.step,
                            sup.evaluate if evaluated else None, setup=sup.setup)
        examples = sup.held_out or sup.train[: max(spec.eval_samples, 1)]

        def base_model_loss(report: dict) -> None:
            # how well the base model (the student before training, on its quantized copy when
            # it trains on one) matches the teacher
            base = ctx.service.create_sampling_client(base_model=served_base(spec)).result()
            report["base_model_loss"] = sup.report(base, examples)["loss"]

        out = conclude(ctx, result, sup, examples, bool(sup.held_out), more=base_model_loss)
        if spec.data is None:
            out["generated_prompts"] = len(sup.prompts) + len(sup.held_prompts)
        return out

    def evaluator(self, ctx: JobContext, folder: Path, data_source):
        if data_source is not None:
            raise UserError("data: a distillation job is evaluated on its teacher's held-out "
                            "answers; evaluate it with an sft-shaped file via a new job")
        rows = self._teacher_rows(folder)
        held = [r for r in rows if r["held_out"]] or rows[: max(ctx.spec.eval_samples, 1)]
        return Supervised(ctx, [], []), [{"messages": r["messages"], "meta": {}} for r in held]

    @staticmethod
    def _teacher_rows(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "teacher_data.jsonl").read_text()
                .splitlines()]

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        """The teacher's answers as the student trains on them once the teacher has written
        them (a submitted job); before that the student's prompts (none yet when the teacher
        writes them)."""
        if folder is not None and (folder / "teacher_data.jsonl").exists():
            rows = self._teacher_rows(folder)
            return ([(*preview_chat(renderer, r["messages"], "last_assistant_message")[:2],
                      {"held_out": r["held_out"]}) for r in rows[:limit]], len(rows))
        if spec.data is None:
            return [], 0
        examples = self.examples(spec.data)
        out = []
        for ex in examples[:limit]:
            tokens = renderer.build_generation_prompt(ex["prompt"]).to_ints()
            out.append((tokens, [0.0] * len(tokens), {}))
        return out, len(examples)

