"""The one interface every job type implements; jobs/registry.py holds the instances by name.

A job type module declares its spec model (a subclass of `spec.Common` with a `type` literal),
how one of its data rows reads, how the job runs, how its adapter is evaluated afterwards and
how its rows are shown before it runs. The defaults here cover job types whose data are rows in
`data` (and `eval_data`); a type with other inputs (an atomic batch's task list, a teacher's
skill file, a grader in a file) overrides the file hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from tuneforge.errors import UserError
from tuneforge.jobs import data
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.spec import Common, resolve_path

PreviewRow = tuple[list[int], list[float], dict]  # tokens, their weights, fields to show too


@contextlib.contextmanager
def blame(field: str) -> Iterator[None]:
    """A UserError raised inside names `field` as the option at fault (unless it names one)."""
    try:
        yield
    except UserError as e:
        if e.fields is None:
            message = e.message.removeprefix(f"{field}: ")
            e.fields = [{"field": field, "message": message}]
        raise


class JobType:
    name: ClassVar[str]
    spec: ClassVar[type[Common]]
    # the options that are files or rows (resolved against the config's folder, inlined by
    # `tuneforge jobs submit`, checked against the server's job files folder)
    data_fields: ClassVar[tuple[str, ...]] = ("data", "eval_data")
    # one adapter per task (evaluated task by task) instead of one for the job
    has_tasks: ClassVar[bool] = False
    # rows are cut at `max_length` (RL prompts are not: its answers are bounded by max_tokens)
    cuts_at_max_length: ClassVar[bool] = True

    @property
    def description(self) -> str:
        return " ".join((self.spec.__doc__ or self.name).split())

    # ---- rows ----------------------------------------------------------------------------------

    def parse_row(self, row: dict) -> dict:
        """One data row (with its `_where`) as the job uses it; UserError naming file:line."""
        raise NotImplementedError

    def examples(self, source, what: str = "data") -> list[dict]:
        return [self.parse_row(row) for row in data.read_rows(source, what)]

    def split(self, spec) -> tuple[list[dict], list[dict]]:
        """(training, held-out) examples: `eval_data`, else a seeded `eval_split`."""
        examples = self.examples(spec.data)
        if spec.eval_data is not None:
            return examples, self.examples(spec.eval_data, "eval_data")
        return data.split(examples, spec.eval_split, spec.seed)

    def eval_examples(self, spec, data_source) -> list[dict]:
        """The rows of `data_source`, else the held-out split (else the training rows)."""
        if data_source is not None:
            return self.examples(data_source)
        train, held_out = self.split(spec)
        return held_out or train

    # ---- checks and files ----------------------------------------------------------------------

    def preflight(self, spec) -> None:
        """Everything that can be checked before the job runs; UserError naming the field."""
        for field in self.data_fields:
            if getattr(spec, field, None) is not None:
                with blame(field):
                    self.examples(getattr(spec, field), field)

    def named_files(self, spec) -> list[tuple[str, str]]:
        """(field, path) for every server file the spec names."""
        return [(f, getattr(spec, f)) for f in self.data_fields
                if isinstance(getattr(spec, f, None), str)]

    def listed_files(self, spec) -> list[tuple[str, str]]:
        """(what, path) for the files that the named files list (read once those are known to
        be readable)."""
        return []

    def user_code(self, spec) -> str | None:
        """The Python code (FILE.py:FUNCTION or module:FUNCTION) the job would run, if any."""
        return None

    def resolve_paths(self, spec, base_dir: Path):
        updates = {f: resolve_path(getattr(spec, f), base_dir) for f in self.data_fields
                   if isinstance(getattr(spec, f, None), str)}
        return spec.model_copy(update=updates)

    def inline(self, spec):
        """The spec with every file it names replaced by its content."""
        update = {f: data.plain_rows(data.read_rows(getattr(spec, f), f))
                  for f in self.data_fields if isinstance(getattr(spec, f, None), str)}
        return spec.model_copy(update=update)

    # ---- running and afterwards ----------------------------------------------------------------

    def run(self, ctx: JobContext) -> dict:
        """Run (or continue) the job to the end; return its summary."""
        raise NotImplementedError

    def evaluator(self, ctx: JobContext, folder: Path, data_source):
        """(evaluator with `.report(sampler, examples)` and a `.renderer` slot, examples) to
        evaluate the job's adapter on `data_source` (default: its held-out split)."""
        raise NotImplementedError

    def preview(self, spec, renderer, folder: Path | None,
                limit: int) -> tuple[list[PreviewRow], int]:
        """The first `limit` rows as the job trains on them, and how many rows there are."""
        raise NotImplementedError
