"""Supervised fine-tuning on prompt/response rows or chats (jobs/supervised.py has the loop's
step and evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tuneforge.jobs import data
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.jobtype import JobType, PreviewRow
from tuneforge.jobs.spec import TRAIN_ON, TRAIN_ON_HELP, Common, DataSource, option
from tuneforge.jobs.supervised import Supervised, preview_chat, train_supervised


class SFTSpec(Common):
    """Supervised fine-tuning: cross-entropy on the assistant's answers of prompt/response rows
    or chats."""

    type: Literal["sft"]
    data: DataSource = option(..., "training rows: a JSONL path or a list of {prompt, response}"
                              " or {messages} rows", group="data")
    train_on: Literal[TRAIN_ON] = option(  # type: ignore[valid-type]
        "last_assistant_message", TRAIN_ON_HELP, group="data")


class SFT(JobType):
    name = "sft"
    spec = SFTSpec

    def parse_row(self, row: dict) -> dict:
        return data.sft_example(row)

    def run(self, ctx: JobContext) -> dict:
        train, held_out = self.split(ctx.spec)
        return train_supervised(ctx, Supervised(ctx, train, held_out, ctx.spec.train_on))

    def evaluator(self, ctx: JobContext, folder: Path, data_source):
        return (Supervised(ctx, [], [], ctx.spec.train_on),
                self.eval_examples(ctx.spec, data_source))

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        examples = self.examples(spec.data)
        return ([preview_chat(renderer, ex["messages"], spec.train_on)
                 for ex in examples[:limit]], len(examples))

