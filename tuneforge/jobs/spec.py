"""Job specifications: what a YAML file (or the same JSON over HTTP) may say, validated before
anything runs.

`Common` holds the options every job type shares; each job type's module declares its own model
(`type` is the discriminator) and the registry (jobs/registry.py) joins them into one union.
Unknown keys are refused (a misspelt option must never be silently ignored). Every option is a
`Field` with a description and a group: the schema the console shows (jobs/schema.py) is
generated from these models, so there is no second copy of the options. Paths are resolved
against the config file's folder. Data is a path to a JSONL file or the rows themselves (a
list), so a job can be posted over HTTP whole.

The base model's weights may be quantized (`quantization`; the agent-skill spellings `adapter:
qlora` and `quant_bits` are accepted and folded into it, so after validation `quantization` is
the one answer and config.yaml carries only it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneforge.errors import UserError
from tuneforge.quantization import QUANTIZATIONS

Rows = list[dict[str, Any]]
DataSource = str | Rows

TRAIN_ON = ("last_assistant_message", "all_assistant_messages", "all_messages")
TRAIN_ON_HELP = ("which tokens the loss is on: the last assistant message, every assistant "
                 "message, or every message")
QUANTIZATION = ("none", *QUANTIZATIONS)
# what each agent-skill spelling allows, as (the quantizations it admits, its words in an error)
ADAPTER_MEANS = {"lora": (("none",), "a full-precision base"),
                 "qlora": (QUANTIZATIONS, "a quantized base, nf4 unless told")}
QUANT_BITS_MEANS = {4: (("nf4", "fp4"), "4-bit: nf4 or fp4"), 8: (("int8",), "8-bit: int8")}


def option(default: Any = ..., description: str = "", *, group: str, **constraints: Any) -> Any:
    """A spec field with its help text and the group the console shows it in."""
    return Field(default, description=description, json_schema_extra={"group": group},
                 **constraints)


class OptionError(ValueError):
    """A rule between options broken; `field` is the option (dotted path) to blame, `also` the
    other options of a contradiction (each gets the message beside it in the console)."""

    def __init__(self, field: str, message: str, also: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.fields = (field, *also)


class Strict(BaseModel):
    """A spec model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class Common(Strict):
    """Hyper-parameters every job type shares."""

    # eval_every and patience need held-out data of the job itself (an atomic batch's tasks may
    # hold out their own)
    held_out_per_task: ClassVar[bool] = False

    name: str | None = option(None, "a name for the run (default: the config file's name)",
                              group="general", max_length=128)
    base_model: str = option(..., "a base model the server offers, e.g. tuneforge/tiny-qwen3",
                             group="model", min_length=1)
    quantization: Literal[QUANTIZATION] = option(  # type: ignore[valid-type]
        "none", "the base model's weights the adapter trains on: none (as served), nf4 or fp4 "
        "(4-bit, QLoRA) or int8; the job uses the server's quantized copy, BASE@QUANTIZATION",
        group="model")
    adapter: Literal["lora", "qlora"] | None = option(
        None, "another spelling of quantization: lora = none, qlora = a quantized base (nf4 "
        "unless quantization or quant_bits says otherwise)", group="model")
    quant_bits: int | None = option(None, "another spelling of quantization: 4 = nf4, 8 = int8",
                                    group="model", ge=4, le=8)
    lora_rank: int = option(32, "rank of the LoRA adapter: higher learns more, costs more "
                            "memory", group="model", ge=1, le=128)
    lora_alpha: float | None = option(
        None, "LoRA alpha: the adapter's output is scaled by alpha / rank (default: the "
        "server's, 32 as in Tinker)", group="model", gt=0, le=4096)
    lora_dropout: float = option(
        0.0, "dropout on the adapter's input during training, as PEFT's lora_dropout (0: none)",
        group="model", ge=0.0, lt=1.0)
    train_attn: bool = option(True, "adapt the attention projections (q, k, v, o)",
                              group="model")
    train_mlp: bool = option(True, "adapt the MLP projections (gate, up, down)", group="model")
    train_unembed: bool = option(True, "adapt the output layer (lm_head)", group="model")
    load_checkpoint_path: str | None = option(
        None, "start from these weights (a tinker:// state path; the optimizer starts fresh)",
        group="model", pattern=r"^tinker://")
    renderer: str | None = option(None, "the cookbook renderer (chat template) that turns rows "
                                  "into tokens; default: chosen from the base model",
                                  group="model")
    learning_rate: float | None = option(None, "peak learning rate; default: the LoRA "
                                         "learning-rate formula (get_lr) for the base model",
                                         group="training", gt=0, le=1.0)
    learning_rate_scale: float | None = option(
        None, "the learning rate as a multiple of the LoRA learning-rate formula's value (get_lr)"
        ", e.g. 0.1 for ten times lower; not with learning_rate", group="training", gt=0,
        le=100.0)
    lr_schedule: Literal["constant", "linear"] = option(
        "linear", "linear: decays to 0 over the run; constant: stays at learning_rate",
        group="training")
    warmup_ratio: float = option(
        0.0, "fraction of the optimizer steps over which the learning rate rises from 0 to its "
        "peak before lr_schedule applies, as transformers' schedules with warmup",
        group="training", ge=0.0, le=0.5)
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", group="training",
                                 ge=0.0, le=1.0)
    max_grad_norm: float = option(0.0, "clip the gradient of each optimizer step to this "
                                  "global norm (0: no clipping)", group="training", ge=0.0)
    batch_size: int = option(8, "rows per forward_backward call (per optimizer step unless "
                             "gradient_accumulation_steps is set)", group="training", ge=1,
                             le=1024)
    gradient_accumulation_steps: int = option(
        1, "forward_backward calls of batch_size rows summed into each optimizer step: the "
        "effective batch is batch_size x gradient_accumulation_steps (steps, the learning-rate "
        "schedule and progress count optimizer steps)", group="training", ge=1, le=256)
    gradient_checkpointing: bool = option(
        False, "recompute activations during the backward pass: less memory, slower, the same "
        "results (off: the server's own setting applies)", group="training")
    epochs: int = option(1, "passes over the training rows", group="training", ge=1, le=1000)
    max_length: int = option(1024, "tokens per row; longer rows are cut at this length",
                             group="training", ge=8, le=131072)
    seed: int = option(0, "seed of the adapter's initialisation, the shuffling, the split and "
                       "sampling", group="training")
    eval_split: float = option(0.0, "fraction of the data held out for evaluation",
                               group="evaluation", ge=0.0, le=0.5)
    eval_data: DataSource | None = option(None, "held-out rows (instead of a split): a JSONL "
                                          "path or a list of rows", group="evaluation")
    eval_every: int = option(0, "steps between evaluations; 0 = each epoch",
                             group="evaluation", ge=0)
    save_every: int = option(0, "steps between checkpoints; 0 = each epoch",
                             group="checkpoints", ge=0)
    patience: int | None = option(None, "evaluations without improvement before stopping "
                                  "early (unset: never stop early)", group="evaluation", ge=1)
    min_delta: float = option(0.0, "the least change of the held-out score that counts as an "
                              "improvement", group="evaluation", ge=0.0)
    eval_samples: int = option(4, "sample outputs shown in the report", group="evaluation",
                               ge=0, le=100)
    eval_max_tokens: int = option(64, "tokens per sample output in the report",
                                  group="evaluation", ge=1, le=4096)

    @model_validator(mode="after")
    def _eval_source(self):
        if self.eval_split and self.eval_data is not None:
            raise OptionError("eval_data", "give eval_split or eval_data, not both")
        held_out = bool(self.eval_split) or self.eval_data is not None
        if not self.held_out_per_task and not held_out:
            for name in ("patience", "eval_every"):
                if getattr(self, name):
                    raise OptionError(name, f"{name} needs held-out data: set eval_split or "
                                      "eval_data")
        return self

    @model_validator(mode="after")
    def _some_target(self):
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise OptionError("train_attn", "at least one of train_attn, train_mlp, "
                              "train_unembed must be on", also=("train_mlp", "train_unembed"))
        return self

    @model_validator(mode="after")
    def _one_learning_rate(self):
        if self.learning_rate is not None and self.learning_rate_scale is not None:
            raise OptionError("learning_rate_scale", "give learning_rate or "
                              "learning_rate_scale, not both", also=("learning_rate",))
        return self

    @model_validator(mode="after")
    def _one_quantization(self):
        """Fold adapter / quant_bits into `quantization` (they are input vocabulary only), so
        everything downstream (config.yaml, an atomic batch's tasks) reads one field."""
        given = self.quantization if "quantization" in self.model_fields_set else None
        self.quantization = resolve_quantization(given, self.adapter, self.quant_bits)
        self.adapter = self.quant_bits = None
        return self


def resolve_quantization(given: str | None, adapter: str | None, bits: int | None) -> str:
    """The quantization that `quantization` (None: not given), `adapter` and `quant_bits` say
    together: the first of nf4, fp4, int8, none that each of them admits (none when no one
    says anything). Two that admit nothing in common are an OptionError naming both."""
    if bits is not None and bits not in QUANT_BITS_MEANS:
        raise OptionError("quant_bits", f"quant_bits must be 4 or 8, not {bits}")
    claims = []  # (field, what it says, the quantizations it admits)
    if given is not None:
        claims.append(("quantization", f"quantization: {given}", (given,)))
    if adapter is not None:
        admits, words = ADAPTER_MEANS[adapter]
        claims.append(("adapter", f"adapter: {adapter} ({words})", admits))
    if bits is not None:
        admits, words = QUANT_BITS_MEANS[bits]
        claims.append(("quant_bits", f"quant_bits: {bits} ({words})", admits))
    for i, (field, said, admits) in enumerate(claims):
        for other, other_said, other_admits in claims[i + 1:]:
            if not set(admits) & set(other_admits):
                raise OptionError(field, f"{said} contradicts {other_said}; give one of them",
                                  also=(other,))
    if not claims:
        return "none"
    for q in (*QUANTIZATIONS, "none"):
        if all(q in admits for _, _, admits in claims):
            return q
    raise AssertionError("pairwise-compatible claims share a quantization")


def field_errors(e: ValidationError, branches: tuple[str, ...]) -> tuple[str, list[dict]]:
    """The text of a validation error (its first 8 problems) and [{field, message}] for each:
    `field` the dotted option path (the union branch, one of `branches`, left out: the type is
    already known; a rule between options names the option it blames)."""
    parts, fields = [], []
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in branches:
            loc = loc[1:]
        msg = err.get("msg", "invalid")
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            msg = "unknown option (not implemented or misspelt)"
        parts.append(f"{'.'.join(loc) or 'config'}: {msg}")
        cause = (err.get("ctx") or {}).get("error")
        blamed = [loc]
        if isinstance(cause, OptionError):
            blamed = [[*loc, field] for field in cause.fields]
        elif not loc and kind.startswith("union_tag"):
            blamed = [["type"]]
        fields += [{"field": ".".join(b) or "config", "message": msg} for b in blamed]
    return "; ".join(parts[:8]), fields


def parse_spec(raw: Any, base_dir: Path | None = None):
    """A validated spec from a mapping; relative paths resolved against `base_dir`. A config in
    the math-tutoring package's layout (jobs/layouts.py) is translated first, and its errors
    name the package's keys."""
    # the registry imports the job type modules, which import this one
    from tuneforge.jobs import layouts, registry

    if layouts.is_layout(raw):
        layout = layouts.translate(raw)
        try:
            return parse_spec(layout.spec, base_dir)
        except UserError as e:
            raise layouts.package_error(e, layout) from None
    if not isinstance(raw, dict):
        message = "a job config must be a mapping (YAML or JSON object)"
        raise UserError(message, fields=[{"field": "config", "message": message}])
    if "type" not in raw:
        message = f"required, one of {', '.join(registry.names())}"
        raise UserError(f"type: {message} (or a config in the tutoring package's layout: "
                        "backend, model, data, training)",
                        fields=[{"field": "type", "message": message}])
    try:
        spec = registry.spec_adapter().validate_python(raw)
    except ValidationError as e:
        text, fields = field_errors(e, registry.names())
        raise UserError(f"invalid job config: {text}", fields=fields) from None
    if base_dir is not None:
        spec = registry.job_type(spec.type).resolve_paths(spec, base_dir)
    return spec


def read_config(path: Path) -> Any:
    """The mapping a YAML (or JSON) job config file holds, unvalidated."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read job config {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid YAML/JSON: {e}") from None


def load_spec(path: Path):
    """Read and validate a YAML (or JSON) job config file."""
    path = Path(path)
    raw = read_config(path)
    if isinstance(raw, dict) and raw.get("name") is None:
        raw = {**raw, "name": path.stem}
    return parse_spec(raw, path.parent)


def resolve_path(value: Any, base_dir: Path) -> Any:
    """A relative file path resolved against `base_dir` (tinker:// paths and rows unchanged)."""
    if isinstance(value, str) and not value.startswith("tinker://"):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base_dir / p).resolve())
    return value


def spec_to_dict(spec) -> dict:
    return spec.model_dump(mode="json", exclude_none=True)
