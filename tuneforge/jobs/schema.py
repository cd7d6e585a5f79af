"""The options of every job type, as a form can show them, generated from the spec models.

    {"types": {TYPE: {"description", "options": [OPTION, ...]}}}
    OPTION = {"name", "type", "default", "required", "help", "enum", "minimum", "maximum",
              "group"} (+ "exclusive_minimum"/"exclusive_maximum": true when the bound itself
              is refused, "nullable": true when null is allowed, "options": [OPTION, ...] for
              an "object")

`type` is one of string, integer, number, boolean, enum, data (a JSONL path or a list of rows)
and object (a nested model, e.g. a distillation job's teacher). The help text is the field's
description, so the form and the validator read one copy of the options.
"""

from __future__ import annotations

import types as pytypes
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tuneforge.jobs.registry import TYPES
from tuneforge.jobs.spec import DataSource

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def schema() -> dict:
    return {"types": {name: {"description": t.description, "options": options(t.spec)}
                      for name, t in TYPES.items()}}


def options(model: type[BaseModel]) -> list[dict]:
    return [option(name, field) for name, field in model.model_fields.items()
            if name != "type"]  # the discriminator: the key of the type itself


def option(name: str, field: FieldInfo) -> dict:
    annotation, nullable = _strip_none(field.annotation)
    out: dict[str, Any] = {"name": name, "type": "string", "default": None,
                           "required": field.is_required(), "help": field.description or "",
                           "enum": None, "minimum": None, "maximum": None,
                           "group": (field.json_schema_extra or {}).get("group", "general")}
    if field.default is not PydanticUndefined:
        out["default"] = field.default
    if nullable:
        out["nullable"] = True
    if annotation == DataSource:
        out["type"] = "data"
    elif typing.get_origin(annotation) is Literal:
        out["type"], out["enum"] = "enum", list(typing.get_args(annotation))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        out["type"], out["options"] = "object", options(annotation)
    elif annotation in _SCALARS:
        out["type"] = _SCALARS[annotation]
    else:
        raise TypeError(f"option {name}: no schema type for {annotation!r}")
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            out["minimum"] = rule.ge
        elif isinstance(rule, annotated_types.Gt):
            out["minimum"], out["exclusive_minimum"] = rule.gt, True
        elif isinstance(rule, annotated_types.Le):
            out["maximum"] = rule.le
        elif isinstance(rule, annotated_types.Lt):
            out["maximum"], out["exclusive_maximum"] = rule.lt, True
        elif isinstance(rule, annotated_types.MinLen):
            out["min_length"] = rule.min_length
        elif isinstance(rule, annotated_types.MaxLen):
            out["max_length"] = rule.max_length
        elif hasattr(rule, "pattern") and rule.pattern:
            out["pattern"] = rule.pattern
    return out


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without `| None`, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, pytypes.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return annotation, False
