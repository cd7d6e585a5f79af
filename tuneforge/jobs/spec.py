"""Job specifications: what a YAML file (or the same JSON over HTTP) may say, validated before
anything runs.

One model per job type, discriminated by `type`; unknown keys are refused (a misspelt option
must never be silently ignored). Paths are resolved against the config file's folder. Data is a
path to a JSONL file or the rows themselves (a list), so a job can be posted over HTTP whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from tuneforge.errors import UserError

Rows = list[dict[str, Any]]
DataSource = str | Rows

TRAIN_ON = ("last_assistant_message", "all_assistant_messages", "all_messages")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Common(_Spec):
    """Hyper-parameters every job type shares."""

    name: str | None = Field(None, max_length=128, description="a name for the run (default: "
                             "the config file's name)")
    base_model: str = Field(..., min_length=1, description="a base model the server offers")
    lora_rank: int = Field(32, ge=1, le=128)
    load_checkpoint_path: str | None = Field(None, pattern=r"^tinker://",
                                             description="start from these weights (a "
                                             "tinker:// state path; the optimizer starts fresh)")
    learning_rate: float | None = Field(None, gt=0, le=1.0,
                                        description="default: the LoRA learning-rate formula "
                                        "(get_lr) for the base model")
    lr_schedule: Literal["constant", "linear"] = "linear"
    batch_size: int = Field(8, ge=1, le=1024)
    epochs: int = Field(1, ge=1, le=1000)
    max_length: int = Field(1024, ge=8, le=131072)
    seed: int = 0
    eval_split: float = Field(0.0, ge=0.0, le=0.5, description="fraction of the data held out")
    eval_data: DataSource | None = Field(None, description="held-out rows (instead of a split)")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = each epoch")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = each epoch")
    patience: int | None = Field(None, ge=1, description="evaluations without improvement "
                                 "before stopping early")
    min_delta: float = Field(0.0, ge=0.0)
    eval_samples: int = Field(4, ge=0, le=100, description="sample outputs in the report")
    eval_max_tokens: int = Field(64, ge=1, le=4096)

    @model_validator(mode="after")
    def _eval_source(self):
        if self.eval_split and self.eval_data is not None:
            raise ValueError("give eval_split or eval_data, not both")
        held_out = bool(self.eval_split) or self.eval_data is not None
        if getattr(self, "type", None) != "atomic" and not held_out:  # tasks may set their own
            for option in ("patience", "eval_every"):
                if getattr(self, option):
                    raise ValueError(f"{option} needs held-out data: set eval_split or "
                                     "eval_data")
        return self


class SFTSpec(Common):
    type: Literal["sft"]
    data: DataSource
    train_on: Literal[TRAIN_ON] = "last_assistant_message"  # type: ignore[valid-type]
    renderer: str | None = None


class DPOSpec(Common):
    type: Literal["dpo"]
    data: DataSource
    dpo_beta: float = Field(0.1, gt=0, le=100)
    renderer: str | None = None


class RLSpec(Common):
    type: Literal["rl"]
    data: DataSource
    grader: str = Field("exact_match", description="exact_match, boxed_number, or "
                        "FILE.py:FUNCTION / module:FUNCTION returning a float reward")
    format_bonus: float = Field(0.1, ge=0, le=1, description="boxed_number: reward for a "
                                "\\boxed{} answer even when wrong")
    group_size: int = Field(4, ge=2, le=64)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0, le=2.0)
    loss_fn: Literal["importance_sampling", "ppo"] = "importance_sampling"
    renderer: str | None = None
    batch_size: int = Field(4, ge=1, le=1024, description="prompts per step")


class Teacher(_Spec):
    model: str = Field(..., min_length=1, description="a base model name, or a tinker:// "
                       "sampler-weights path")
    base_model: str | None = Field(None, description="the checkpoint's base model (for a "
                                   "tinker:// teacher)")
    system_prompt: str | None = None
    skill_file: str | None = Field(None, description="a file (e.g. SKILL.md) given to the teacher "
                                   "as its system prompt")
    temperature: float = Field(0.7, ge=0, le=2.0)
    max_tokens: int = Field(128, ge=1, le=4096)
    samples_per_prompt: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _context(self):
        if self.system_prompt is not None and self.skill_file is not None:
            raise ValueError("give system_prompt or skill_file, not both")
        return self


class DistillSpec(Common):
    type: Literal["distill"]
    data: DataSource = Field(..., description="prompts: rows with a 'prompt' field")
    teacher: Teacher
    renderer: str | None = None


class AtomicSpec(Common):
    """Many small SFT adapters, one per task, trained at once."""

    type: Literal["atomic"]
    tasks: DataSource = Field(..., description="a folder of TASK.jsonl files, or a JSONL (or "
                              "list) of {name, data, ...overrides}")
    max_concurrent: int = Field(8, ge=1, le=256)
    train_on: Literal[TRAIN_ON] = "last_assistant_message"  # type: ignore[valid-type]
    renderer: str | None = None


TASK_OVERRIDES = ("learning_rate", "lora_rank", "epochs", "batch_size", "patience", "min_delta",
                  "eval_split", "eval_every", "max_length", "seed")

JobSpec = Annotated[SFTSpec | DPOSpec | RLSpec | DistillSpec | AtomicSpec,
                    Field(discriminator="type")]
_ADAPTER = TypeAdapter(JobSpec)


def format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:8]:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("sft", "dpo", "rl", "distill", "atomic"):
            loc = loc[1:]  # the union branch: the type is already known
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown option (not implemented or misspelt)"
        parts.append(f"{'.'.join(loc) or 'config'}: {msg}")
    return "; ".join(parts)


def parse_spec(raw: Any, base_dir: Path | None = None):
    """A validated spec from a mapping; relative paths resolved against `base_dir`."""
    if not isinstance(raw, dict):
        raise UserError("a job config must be a mapping (YAML or JSON object)")
    if "type" not in raw:
        raise UserError("type: required, one of sft, dpo, rl, distill, atomic")
    try:
        spec = _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise UserError(f"invalid job config: {format_errors(e)}") from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    return spec


def load_spec(path: Path):
    """Read and validate a YAML (or JSON) job config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read job config {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid YAML/JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("name") is None:
        raw = {**raw, "name": path.stem}
    return parse_spec(raw, path.parent)


def _resolve_paths(spec, base_dir: Path):
    def fix(value):
        if isinstance(value, str) and not value.startswith("tinker://"):
            p = Path(value).expanduser()
            return str(p if p.is_absolute() else (base_dir / p).resolve())
        return value

    updates = {}
    for field in ("data", "eval_data", "tasks"):
        if isinstance(getattr(spec, field, None), str):
            updates[field] = fix(getattr(spec, field))
    if isinstance(spec, RLSpec) and spec.grader.count(":") == 1 and ".py:" in spec.grader:
        file, func = spec.grader.split(":")
        updates["grader"] = f"{fix(file)}:{func}"
    if isinstance(spec, DistillSpec) and spec.teacher.skill_file:
        updates["teacher"] = spec.teacher.model_copy(
            update={"skill_file": fix(spec.teacher.skill_file)})
    return spec.model_copy(update=updates)


def spec_to_dict(spec) -> dict:
    return spec.model_dump(mode="json", exclude_none=True)
