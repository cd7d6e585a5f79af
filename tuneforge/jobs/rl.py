"""Reinforcement learning with verifiable rewards.

Each step samples `group_size` answers per prompt from the current weights, grades them, and
trains on the group-centred rewards (advantage = reward - group mean; groups where every answer
got the same reward teach nothing and are left out) with the server's `importance_sampling` (or
`ppo`) loss. The sampler's and the trainer's log-probabilities of the sampled tokens are compared
every step (`kl_sampler_trainer`, their mean difference; it stays near 0 when the two agree).

Graders: `exact_match` (normalized text), `boxed_number` (the last \\boxed{...} parsed as a
number: 1 when right, `format_bonus` when boxed but wrong, 0 when not boxed), or a user function
named as FILE.py:FUNCTION or module:FUNCTION, called as FUNCTION(response, answer) -> float.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from tinker import types

from tuneforge.errors import UserError
from tuneforge.jobs import data, evaluate
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.jobtype import JobType, PreviewRow, blame
from tuneforge.jobs.loop import adam, conclude, micro_batches, train_loop
from tuneforge.jobs.model import renderer_for
from tuneforge.jobs.spec import Common, DataSource, option, resolve_path

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
BUILTIN_GRADERS = ("exact_match", "boxed_number")


class RLSpec(Common):
    """Reinforcement learning with verifiable rewards: answers sampled in groups from the
    current weights, graded, and trained on their reward relative to their group."""

    type: Literal["rl"]
    data: DataSource = option(..., "prompts with the expected answer: a JSONL path or a list of"
                              " {prompt, answer} rows", group="data")
    grader: str = option("exact_match", "how an answer earns its reward: exact_match, "
                         "boxed_number, or FILE.py:FUNCTION / module:FUNCTION returning a float",
                         group="rl")
    format_bonus: float = option(0.1, "boxed_number: reward for a \\boxed{} answer even when "
                                 "wrong", group="rl", ge=0, le=1)
    group_size: int = option(4, "answers sampled per prompt (their rewards are compared with "
                             "each other)", group="rl", ge=2, le=64)
    max_tokens: int = option(64, "tokens per sampled answer", group="rl", ge=1, le=4096)
    temperature: float = option(1.0, "sampling temperature of the answers", group="rl", gt=0,
                                le=2.0)
    loss_fn: Literal["importance_sampling", "ppo"] = option(
        "importance_sampling", "the policy-gradient loss: importance_sampling or ppo (clipped)",
        group="rl")
    batch_size: int = option(4, "prompts per forward_backward call (per step unless "
                             "gradient_accumulation_steps is set)", group="training", ge=1,
                             le=1024)


def exact_match(response: str, answer: str) -> float:
    return float(evaluate.normalize(response) == evaluate.normalize(answer))


def boxed_number(format_bonus: float) -> Callable[[str, str], float]:
    def grade(response: str, answer: str) -> float:
        found = BOXED.findall(response)
        if not found:
            return 0.0
        try:
            got = float(found[-1].replace(",", "").strip())
            want = float(str(answer).replace(",", "").strip())
        except ValueError:
            return format_bonus
        return 1.0 if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9) else format_bonus
    return grade


def load_grader(name: str, format_bonus: float = 0.1) -> Callable[[str, str], float]:
    if name == "exact_match":
        return exact_match
    if name == "boxed_number":
        return boxed_number(format_bonus)
    if ":" not in name:
        raise UserError(f"grader: {name!r} is not exact_match, boxed_number, FILE.py:FUNCTION "
                        "or module:FUNCTION")
    where, func = name.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise UserError(f"grader: no such file {where}")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"grader: cannot load {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"grader: {where} has no function {func!r}")
    return fn


class Reinforce:
    def __init__(self, ctx: JobContext, train: list[dict], held_out: list[dict]) -> None:
        self.ctx, self.train, self.held_out = ctx, train, held_out
        self.grade = load_grader(ctx.spec.grader, ctx.spec.format_bonus)
        self.renderer = None
        self.prompts: list[list[int]] = []

    def setup(self, tc) -> None:
        spec = self.ctx.spec
        name, self.renderer = renderer_for(spec, tc)
        self.prompts = [self.renderer.build_generation_prompt(ex["prompt"]).to_ints()
                        for ex in self.train]
        self.ctx.run.log(f"renderer {name}; {len(self.train)} training and "
                         f"{len(self.held_out)} held-out prompts; grader {spec.grader}")

    def step(self, tc, indices: list[int], lr: float) -> dict:
        """Every prompt of the step sampled from the current weights at once (on-policy for
        the whole effective batch), then one forward_backward per `batch_size` prompts: the
        loss is a sum over tokens, so those calls add up to the gradient of one over all."""
        spec = self.ctx.spec
        sampler = tc.save_weights_and_get_sampling_client().result()
        futures = dict(zip(indices, self._sample(sampler, indices), strict=True))
        rewards, calls = [], []
        for batch in micro_batches(spec, indices):
            data, sampled = [], []
            for i in batch:
                group_data, group_sampled, group_rewards = self._group(
                    i, futures[i].result().sequences)
                data += group_data
                sampled += group_sampled
                rewards += group_rewards
            if data:
                calls.append((sampled, tc.forward_backward(data, spec.loss_fn)))
        metrics = {"reward": sum(rewards) / len(rewards),
                   "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
                   "trained_sequences": sum(len(sampled) for sampled, _ in calls)}
        if not calls:
            return {**metrics, "loss": 0.0, "kl_sampler_trainer": 0.0}
        tc.optim_step(adam(spec, lr)).result()
        loss, diffs = 0.0, []
        for sampled, fut in calls:
            out = fut.result()
            loss += out.metrics["loss:sum"]
            for (n_prompt, sampler_lp), o in zip(sampled, out.loss_fn_outputs, strict=True):
                trainer_lp = o["logprobs"].tolist()[n_prompt:]
                diffs.extend(s - t for s, t in zip(sampler_lp, trainer_lp, strict=True))
        return {**metrics, "loss": loss / max(len(diffs), 1),
                "kl_sampler_trainer": sum(diffs) / len(diffs),
                "max_abs_logprob_diff": max(abs(d) for d in diffs)}

    def _sample(self, sampler, indices: list[int]) -> list:
        """A group of answers for each prompt (futures), seeded by step and row."""
        spec = self.ctx.spec
        step_no = self.ctx.progress.step
        return [sampler.sample(
            types.ModelInput.from_ints(self.prompts[i]), spec.group_size,
            types.SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature,
                                 stop=self.renderer.get_stop_sequences(),
                                 seed=spec.seed * 1_000_003 + step_no * 1009 + i))
            for i in indices]

    def _group(self, i: int, seqs) -> tuple[list[types.Datum], list, list[float]]:
        """(datums, [(prompt length, sampler logprobs)], rewards) of row i's sampled group; no
        datums when every answer got the same reward (the group teaches nothing)."""
        group = [self.grade(evaluate.text_of(self.renderer.parse_response(s.tokens)[0]),
                            self.train[i]["answer"]) for s in seqs]
        mean = sum(group) / len(group)
        if all(abs(r - mean) < 1e-9 for r in group):
            return [], [], group
        prompt = self.prompts[i]
        data, sampled = [], []
        for seq, reward in zip(seqs, group, strict=True):
            if not seq.tokens:
                continue
            tokens = prompt + list(seq.tokens)
            n_prompt = len(prompt) - 1
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_torch(torch.tensor(tokens[1:])),
                    "logprobs": types.TensorData.from_torch(torch.tensor(
                        [0.0] * n_prompt + list(seq.logprobs), dtype=torch.float32)),
                    "advantages": types.TensorData.from_torch(torch.tensor(
                        [0.0] * n_prompt + [reward - mean] * len(seq.tokens),
                        dtype=torch.float32)),
                }))
            sampled.append((n_prompt, list(seq.logprobs)))
        return data, sampled, group

    def report(self, sampler, examples: list[dict]) -> dict:
        spec = self.ctx.spec
        return evaluate.graded_report(sampler, self.renderer, examples, self.grade,
                                      spec.max_tokens, spec.eval_samples)

    def evaluate(self, tc) -> dict:
        r = self.report(tc.save_weights_and_get_sampling_client().result(), self.held_out)
        return {"eval_reward": r["reward"], "eval_accuracy": r["accuracy"]}


class RL(JobType):
    name = "rl"
    spec = RLSpec
    cuts_at_max_length = False

    def parse_row(self, row: dict) -> dict:
        return data.rl_example(row)

    def preflight(self, spec) -> None:
        super().preflight(spec)
        with blame("grader"):
            load_grader(spec.grader, spec.format_bonus)

    def user_code(self, spec) -> str | None:
        return None if spec.grader in BUILTIN_GRADERS else spec.grader

    def resolve_paths(self, spec, base_dir: Path):
        spec = super().resolve_paths(spec, base_dir)
        if spec.grader.count(":") == 1 and ".py:" in spec.grader:
            file, func = spec.grader.split(":")
            spec = spec.model_copy(update={"grader": f"{resolve_path(file, base_dir)}:{func}"})
        return spec

    def run(self, ctx: JobContext) -> dict:
        train, held_out = self.split(ctx.spec)
        rl = Reinforce(ctx, train, held_out)
        result = train_loop(ctx, len(train), rl.step, rl.evaluate if held_out else None,
                            maximize=True, eval_name="eval_reward", train_key="reward",
                            setup=rl.setup)
        return conclude(ctx, result, rl, held_out or train, bool(held_out), key="reward")

    def evaluator(self, ctx: JobContext, folder: Path, data_source):
        return Reinforce(ctx, [], []), self.eval_examples(ctx.spec, data_source)

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        """The prompts as the sampler sees them (the answers are sampled while it trains)."""
        examples = self.examples(spec.data)
        rows = []
        for ex in examples[:limit]:
            tokens = renderer.build_generation_prompt(ex["prompt"]).to_ints()
            rows.append((tokens, [0.0] * len(tokens), {"answer": ex["answer"]}))
        return rows, len(examples)
