"""The job types, by name: the one place a job type is registered.

Each entry is an instance of a `JobType` subclass (jobs/jobtype.py) from the type's own module,
which declares its spec model, how its rows read, how it runs and how it is evaluated and
previewed. Everything else (spec parsing, preflight, the schema, the server's host interface)
looks a type up here instead of testing `spec.type`.
"""

from __future__ import annotations

import functools
from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from tuneforge.errors import UserError
from tuneforge.jobs.atomic import Atomic
from tuneforge.jobs.distill import Distill
from tuneforge.jobs.dpo import DPO
from tuneforge.jobs.jobtype import JobType
from tuneforge.jobs.rl import RL
from tuneforge.jobs.sft import SFT

TYPES: dict[str, JobType] = {t.name: t for t in (SFT(), DPO(), RL(), Distill(), Atomic())}


def names() -> tuple[str, ...]:
    return tuple(TYPES)


def job_type(name: str) -> JobType:
    try:
        return TYPES[name]
    except KeyError:
        raise UserError(f"type: {name!r} is not one of {', '.join(TYPES)}") from None


@functools.cache
def spec_adapter() -> TypeAdapter:
    """The validator of any job spec: the types' models, discriminated by `type`."""
    specs = tuple(t.spec for t in TYPES.values())
    return TypeAdapter(Annotated[Union[specs], Field(discriminator="type")])  # noqa: UP007
