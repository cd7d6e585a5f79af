"""The agent-skill adapter's REST API, as a second door onto the job manager (server/jobs.py).

That project trains an adapter for a SKILL.md through `POST /api/training/start` and reads its
settings from `SKILL_ADAPTER_*` env vars. Here a start is a `distill` job, the same one the
console's "From a SKILL.md" form makes: the teacher is the base model with the skill as its
system prompt, it writes the requests the skill covers and answers them, and the student
learns those answers without the skill. This module holds that door's decisions:

- `SkillSettings`: the env vars, their documented defaults (rank 16, alpha 32, dropout 0.05,
  learning rate 2e-4, batch 4 x 4 accumulation steps, 3 epochs, 2048 tokens), read and checked
  once when the server starts; a bad value stops the start with the variable's name. A
  `SKILL_ADAPTER_*` variable this server does not know is refused the same way, except the
  ones of that project's own service (its host, port, queue, judge and inference settings),
  which mean nothing here.
- `job_spec`: a start request's body (its fields checked by name) and the settings as a job
  spec. `adapter_type: lora` trains on the base as served (the quant-bits setting applies to
  qlora only, as in that project); `qlora` on the 4-bit (nf4) or 8-bit (int8) copy.
- `status_json`: a job as that API shows it (progress 0-1, epochs, latest loss; the job
  manager's statuses, which are that API's: queued, running, completed, failed, and cancelled
  for a job stopped through the job API).
- `write_layout`: that project's checkpoint folders, `CHECKPOINT_DIR/JOB_ID/checkpoint-STEP/`
  (adapter and `optimizer.pt`) and `final/` (the kept adapter), made from what the job saved:
  its training checkpoints as the server stores them and the adapter it exported, hard-linked
  (copied across file systems), so nothing is trained or converted twice. Job ids of this door
  already read `train-…`, so the folder is the job id itself (`checkpoints/train-abc123/final`,
  as that project's guide shows).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneforge.errors import UserError
from tuneforge.jobs import host
from tuneforge.storage import checkpoints as ckpt_files

PREFIX = "SKILL_ADAPTER_"
ID_PREFIX = "train"
# that project's service settings: accepted in the environment, unused by this server
FOREIGN = {"API_HOST", "API_PORT", "REDIS_URL", "JUDGE_MODEL", "SKILLS_DIR", "INFERENCE_URL"}
LAYOUT_FILES = (ckpt_files.ADAPTER_FILE, ckpt_files.CONFIG_FILE, ckpt_files.OPTIMIZER_FILE)


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*(PREFIX + n for n in names))


class SkillSettings(BaseSettings):
    """Defaults of the agent-skill routes. Env prefix `SKILL_ADAPTER_`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    model: str = Field("Qwen/Qwen3-30B-A3B", min_length=1)
    """The base model (student and teacher): a model this server serves."""
    adapter: Literal["lora", "qlora"] = "lora"
    quant_bits: Literal[4, 8] = 4
    """qlora only: 4 = nf4, 8 = int8."""
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(4, ge=1, le=256)
    num_epochs: int = Field(3, ge=1, le=1000)
    max_seq_length: int = Field(2048, ge=8, le=131072,
                                validation_alias=_env("MAX_SEQ_LENGTH", "MAX_SEQ_LEN"))
    lora_r: int = Field(16, ge=1, le=128, validation_alias=_env("LORA_R", "LORA_RANK"))
    lora_alpha: float = Field(32.0, gt=0, le=4096)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    num_prompts: int = Field(16, ge=1, le=256)
    """Requests the teacher writes from the skill (generate_prompts)."""
    eval_split: float = Field(0.25, ge=0.0, le=0.5)
    """Share of them held out for the evaluation."""
    teacher_max_tokens: int = Field(128, ge=1, le=4096)
    checkpoint_dir: Path | None = None
    """Where `JOB_ID/checkpoint-STEP/` and `JOB_ID/final/` go; default the job's folder's
    `checkpoints/`."""


def env_name(field: str) -> str:
    info = SkillSettings.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        names = [str(c) for c in info.validation_alias.choices]
        return next((n for n in names if n in os.environ), names[0])
    return PREFIX + field.upper()


def load_settings(environ: dict[str, str] | None = None) -> SkillSettings:
    """The settings from the environment; UserError naming the variable at fault."""
    environ = os.environ if environ is None else environ
    known = {env_name(f) for f in SkillSettings.model_fields}
    known |= {str(c) for f in SkillSettings.model_fields.values()
              if isinstance(f.validation_alias, AliasChoices) for c in f.validation_alias.choices}
    for name in sorted(environ):
        if (name.upper().startswith(PREFIX) and name.upper() not in known
                and name.upper()[len(PREFIX):] not in FOREIGN):
            raise UserError(f"{name}: unknown setting (known: {', '.join(sorted(known))})")
    try:
        return SkillSettings()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err.get("loc") else "?"
            name = env_name(field) if field in SkillSettings.model_fields else field
            problems.append(f"{name}={environ.get(name, '')!r}: {err.get('msg')}")
        raise UserError("; ".join(problems)) from None


class StartBody(BaseModel):
    """The body of POST /api/training/start; a field left out takes its setting."""

    model_config = ConfigDict(extra="forbid")

    skill_path: str | None = Field(None, min_length=1)
    """A SKILL.md inside the server's job files folder (relative paths: to that folder)."""
    skill_content: str | None = Field(None, min_length=1)
    """The text of an uploaded SKILL.md, instead of skill_path."""
    adapter_type: Literal["lora", "qlora"] | None = None
    num_epochs: int | None = Field(None, ge=1, le=1000, strict=True)
    learning_rate: float | None = Field(None, gt=0, le=1.0)
    batch_size: int | None = Field(None, ge=1, le=1024, strict=True)


def _body(raw: dict) -> StartBody:
    try:
        body = StartBody.model_validate(raw)
    except ValidationError as e:
        fields, parts = [], []
        for err in e.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "body"
            msg = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                msg = (f"unknown field (fields: {', '.join(StartBody.model_fields)})")
            fields.append({"field": field, "message": msg})
            parts.append(f"{field}: {msg}")
        raise UserError("; ".join(parts), fields=fields) from None
    if (body.skill_path is None) == (body.skill_content is None):
        message = "give skill_path (a SKILL.md on this server) or skill_content (its text)"
        raise UserError(f"skill_path: {message}",
                        fields=[{"field": "skill_path", "message": message}])
    return body


def check_model(state, name: str) -> None:
    """Refuse a base model this server cannot serve without downloading it while offline."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return  # the job downloads it, as any job would
    try:
        state.registry.resolve(name)
    except UserError as e:
        message = (f"{name!r} (SKILL_ADAPTER_MODEL) is not served here and the Hugging Face "
                   f"hub is offline ({e.message}); set SKILL_ADAPTER_MODEL, or "
                   "TUNEFORGE_MODEL_ALIASES to serve it under that name")
        raise UserError(f"model: {message}",
                        fields=[{"field": "model", "message": message}]) from None


def job_spec(state, settings: SkillSettings, raw: dict) -> dict:
    """The distill job a start request stands for (its skill file checked as every job's)."""
    body = _body(raw)
    teacher: dict = {"model": settings.model, "max_tokens": settings.teacher_max_tokens}
    if body.skill_path is not None:
        if state.settings.job_files_dir is None:
            message = ("this server reads no files for jobs (the operator sets "
                       "TUNEFORGE_JOB_FILES_DIR); send the skill's text as skill_content")
            raise UserError(f"skill_path: {message}",
                            fields=[{"field": "skill_path", "message": message}])
        path = Path(state.jobs.check_file("skill_path", body.skill_path))
        if not path.is_file():
            message = f"no such file {body.skill_path!r} in the job files folder"
            raise UserError(f"skill_path: {message}",
                            fields=[{"field": "skill_path", "message": message}])
        teacher["skill_file"] = str(path)
        name = path.parent.name if path.name.upper() == "SKILL.MD" else path.stem
    else:
        teacher["system_prompt"] = body.skill_content
        name = "uploaded skill"
    check_model(state, settings.model)
    adapter = body.adapter_type or settings.adapter
    spec = {
        "type": "distill", "name": f"skill: {name}"[:128], "base_model": settings.model,
        "teacher": teacher, "generate_prompts": settings.num_prompts,
        "eval_split": settings.eval_split,
        "epochs": body.num_epochs or settings.num_epochs,
        "learning_rate": body.learning_rate or settings.learning_rate,
        "batch_size": body.batch_size or settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_length": settings.max_seq_length, "lora_rank": settings.lora_r,
        "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "adapter": adapter,
    }
    if adapter == "qlora":
        spec["quant_bits"] = settings.quant_bits
    return spec


def iso(when: dt.datetime | None) -> str | None:
    """UTC, as that API writes times: 2026-02-07T10:30:05Z."""
    if when is None:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.isoformat(timespec="seconds") + "Z"


def status_json(row) -> dict:
    progress = row.progress or {}
    loss = progress.get("loss")
    return {
        "job_id": row.id, "status": row.status,
        "progress": float(progress.get("progress") or 0.0),
        "current_epoch": int(progress.get("epoch") or 0),
        "total_epochs": int(row.spec.get("epochs", 1)),
        "loss": float(loss) if loss is not None else None,
        "started_at": iso(row.started_at),
    }


def log_lines(row) -> list[str]:
    path = Path(row.folder) / "log.txt"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def evaluation_json(row, evaluated: dict) -> dict:
    """host.evaluate's answer as that API's evaluation: held-out accuracy (exact match of the
    greedy answer with the teacher's), BLEU (sacrebleu, 0-100), perplexity, and the report."""
    report = evaluated["report"]
    spec = row.spec
    held_out = bool(spec.get("eval_split")) or spec.get("eval_data") is not None
    return {
        "job_id": row.id, "status": row.status,
        "split": "held-out" if held_out else "train",
        "num_examples": int(evaluated["examples"]),
        "accuracy": float(report.get("exact_match", 0.0)),
        "bleu": float(report.get("bleu", 0.0)),
        "perplexity": float(report["perplexity"]),
        "loss": float(report["loss"]),
        "report": report,
        "evaluated_at": iso(dt.datetime.now(dt.UTC)),
    }


def layout_root(settings: SkillSettings, row) -> Path:
    base = settings.checkpoint_dir or Path(row.folder) / "checkpoints"
    return Path(base).expanduser().resolve() / row.id


def write_layout(state, settings: SkillSettings, row, status: str) -> Path | None:
    """That project's checkpoint folders for a job of this door (see the module docstring);
    folders already there are kept, so calling it again adds only what is new."""
    if not row.id.startswith(f"{ID_PREFIX}-"):
        return None
    from tuneforge.server.state import parse_tinker_path

    folder = Path(row.folder)
    root = layout_root(settings, row)
    for step, state_path in host.saved_states(folder):
        source = state.paths.checkpoint(*parse_tinker_path(state_path))
        if source.is_dir():  # (an expired checkpoint is gone)
            _place(source, root / f"checkpoint-{step}", LAYOUT_FILES)
    adapter = host.exported_adapter(folder)
    if status == "completed" and adapter is not None:
        _place(adapter, root / "final", tuple(p.name for p in adapter.iterdir() if p.is_file()))
    return root


def _place(source: Path, dest: Path, names: tuple[str, ...]) -> None:
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name in names:
            if not (source / name).exists():
                continue
            try:
                os.link(source / name, tmp / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(source / name, tmp / name)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
