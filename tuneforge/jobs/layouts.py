"""The math-tutoring package's config layout, translated into a job spec.

That package (packages/training of posttraining-math-tutor) writes its training configs as
sections instead of flat options:

    backend: local            # or tinker
    model:
      base_model: qwen3:8b
    data:
      train_file: data/train.jsonl
      eval_file: data/eval.jsonl
    training:
      num_epochs: 3
      batch_size: 8
      learning_rate: 2e-5

A config is in this layout when it has no `type` and has a `backend` or `method` key, or a
`model` / `data` / `training` section (a mapping). `translate` turns it into the flat spec of
jobs/spec.py: each key of the package maps to one option (`MAPPING`, which the README shows side
by side), and every option of a tuneforge group may also be given under its own name in the
section of that group (`SECTION_GROUPS`), e.g. `training.lr_schedule` or `model.quantization`.
Keys the package knows but tuneforge cannot honour are accepted only at the values that mean
what tuneforge does (e.g. `use_peft: true`); anything else is refused by its dotted path, as an
unknown key is. `peft_config.target_modules` becomes the training client's switches
(`train_attn`, `train_mlp`, `train_unembed`): a list of whole groups of layers. Two keys that
name one option (`training.num_epochs` and `training.epochs`) are refused too.

The job type is the package's method: `method: sft | distillation | rlvr`, or, without it, a
`teacher` section means distillation, an `rlvr` section RLVR, and anything else SFT. Errors found
later (by the spec's validation or the preflight) are put back in the package's terms with
`package_error`, so a bad `training.learning_rate` is reported under that name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from tuneforge.errors import UserError

BACKENDS = ("local", "tinker")
# the package's method → tuneforge's job type
METHODS = {"sft": "sft", "distillation": "distill", "rlvr": "rl"}
# a section's own tuneforge options: those of these groups (jobs/spec.py `option(group=...)`)
SECTION_GROUPS = {
    "model": ("model",),
    "data": ("data", "evaluation"),
    "training": ("training", "checkpoints"),
    "rlvr": ("rl",),
}
TOP_LEVEL = ("backend", "method", "name", "model", "data", "training", "teacher", "rlvr")
# the groups of layers a training client adapts, each switched on or off as a whole
TARGET_SWITCHES = {"train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                   "train_mlp": ("gate_proj", "up_proj", "down_proj"),
                   "train_unembed": ("lm_head",)}

# (the package's key, tuneforge's option or what it means, for which methods); the README table
MAPPING: tuple[tuple[str, str, str], ...] = (
    ("backend: local", "the embedded server (`tuneforge train` without --url)", "all"),
    ("backend: tinker", "the server at TINKER_BASE_URL, key TINKER_API_KEY", "all"),
    ("method: sft | distillation | rlvr", "type: sft | distill | rl", "all"),
    ("name", "name", "all"),
    ("model.base_model", "base_model (Ollama names like qwen3:8b resolve on the server)", "all"),
    ("model.model_type: causal_lm", "(the only kind)", "all"),
    ("model.use_peft: true", "(LoRA is the only method)", "all"),
    ("model.peft_config.r", "lora_rank", "all"),
    ("model.peft_config.lora_alpha", "lora_alpha", "all"),
    ("model.peft_config.lora_dropout", "lora_dropout", "all"),
    ("model.peft_config.target_modules", "train_attn (q/k/v/o_proj), train_mlp "
     "(gate/up/down_proj), train_unembed (lm_head): whole groups", "all"),
    ("data.train_file", "data", "all"),
    ("data.eval_file", "eval_data", "all"),
    ("data.max_seq_length", "max_length", "all"),
    ("data.prompt_template: chat", "(the base model's chat template, `renderer`)", "all"),
    ("data.num_prompts", "generate_prompts", "distillation"),
    ("training.output_dir", "the experiment folder (--out; relative to the config)", "all"),
    ("training.num_epochs", "epochs", "all"),
    ("training.batch_size", "batch_size", "all"),
    ("training.gradient_accumulation_steps", "gradient_accumulation_steps", "all"),
    ("training.learning_rate", "learning_rate", "all"),
    ("training.warmup_ratio", "warmup_ratio", "all"),
    ("training.weight_decay", "weight_decay", "all"),
    ("training.max_grad_norm", "max_grad_norm (null: 0, no clipping)", "all"),
    ("training.logging_steps", "(every step is logged to metrics.jsonl)", "all"),
    ("training.eval_steps", "eval_every", "all"),
    ("training.save_steps", "save_every", "all"),
    ("training.seed", "seed", "all"),
    ("teacher.model, .base_model, .system_prompt, .temperature, .max_tokens, "
     ".samples_per_prompt", "teacher.* (the same names)", "distillation"),
    ("teacher.system_prompt_file", "teacher.skill_file", "distillation"),
    ("rlvr.grader, .format_bonus, .group_size, .max_tokens, .temperature, .loss_fn",
     "the same names", "rlvr"),
)

# key → option, per section (the nested peft_config and teacher are handled on their own)
RENAMES = {
    "model": {"base_model": "base_model"},
    "data": {"train_file": "data", "eval_file": "eval_data", "max_seq_length": "max_length",
             "num_prompts": "generate_prompts"},
    "training": {"num_epochs": "epochs", "batch_size": "batch_size",
                 "gradient_accumulation_steps": "gradient_accumulation_steps",
                 "learning_rate": "learning_rate", "warmup_ratio": "warmup_ratio",
                 "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
                 "eval_steps": "eval_every",
                 "save_steps": "save_every", "seed": "seed"},
}
# an option → the package's key for it, for options the config does not give
PACKAGE_NAMES = {option: f"{section}.{key}" for section, renames in reversed(RENAMES.items())
                 for key, option in renames.items()}
PEFT_RENAMES = {"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
TEACHER_RENAMES = {"system_prompt_file": "skill_file"}


@dataclass
class Layout:
    """A config of the package, translated: `spec` is in tuneforge's vocabulary, `origin` maps
    each of its options (dotted) back to the package's key."""

    method: str  # sft | distillation | rlvr
    backend: str | None
    output_dir: str | None
    spec: dict[str, Any]
    origin: dict[str, str] = field(default_factory=dict)


def is_layout(raw: Any) -> bool:
    if not isinstance(raw, dict) or "type" in raw:
        return False
    return ("backend" in raw or "method" in raw
            or any(isinstance(raw.get(s), dict) for s in ("model", "data", "training")))


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, message: str) -> None:
        self.items.append((where, message))

    def raise_any(self) -> None:
        if self.items:
            text = "; ".join(f"{w}: {m}" for w, m in self.items[:8])
            raise UserError(f"invalid job config: {text}",
                            fields=[{"field": w, "message": m} for w, m in self.items])


def _unknown(section: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    prefix = f"{section}." if section else ""
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown option (not implemented or misspelt{hint})"


def _spec_fields(job_type: str) -> dict[str, str]:
    """The job type's options (besides `type` and `teacher`) → their group."""
    from tuneforge.jobs.registry import job_type as lookup

    fields = lookup(job_type).spec.model_fields
    return {name: (f.json_schema_extra or {}).get("group", "general")
            for name, f in fields.items() if name not in ("type", "teacher")}


def method_of(raw: dict) -> str:
    method = raw.get("method")
    if method is None:
        return "distillation" if "teacher" in raw else "rlvr" if "rlvr" in raw else "sft"
    if method not in METHODS:
        raise UserError(f"method: {method!r} is not one of {', '.join(METHODS)}",
                        fields=[{"field": "method", "message": f"one of {', '.join(METHODS)}"}])
    return method


def translate(raw: dict) -> Layout:
    """The job spec a config of the package stands for (see the module docstring)."""
    method = method_of(raw)
    job_type = METHODS[method]
    problems = _Problems()
    spec: dict[str, Any] = {"type": job_type}
    origin: dict[str, str] = {}

    def put(option: str, value: Any, where: str) -> None:
        if option in spec:
            problems.add(where, f"the same option as {origin[option]}; give one of them")
            return
        spec[option] = value
        origin[option] = where

    for key in raw:
        if key not in TOP_LEVEL:
            problems.add(str(key), _unknown("", str(key), list(TOP_LEVEL)))
    backend = raw.get("backend")
    if backend is not None and backend not in BACKENDS:
        problems.add("backend", f"{backend!r} is not one of {', '.join(BACKENDS)} (tinker: any "
                     "Tinker-protocol server, at TINKER_BASE_URL)")
    if "teacher" in raw and method != "distillation":
        problems.add("teacher", f"a teacher section is for method distillation, not {method}")
    if "rlvr" in raw and method != "rlvr":
        problems.add("rlvr", f"an rlvr section is for method rlvr, not {method}")
    if raw.get("name") is not None:
        put("name", raw["name"], "name")

    groups = _spec_fields(job_type)
    output_dir = None
    for section in ("model", "data", "training", "rlvr"):
        body = raw.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.add(section, "must be a mapping of options")
            continue
        own = [n for n, g in groups.items() if g in SECTION_GROUPS[section]]
        renames = RENAMES.get(section, {})
        known = sorted({*renames, *own, *_CHECKED.get(section, {})}
                       | ({"peft_config"} if section == "model" else set())
                       | ({"output_dir"} if section == "training" else set()))
        for key, value in body.items():
            where = f"{section}.{key}"
            if section == "model" and key == "peft_config":
                _peft(value, where, put, problems)
            elif section == "training" and key == "output_dir":
                if not isinstance(value, str) or not value:
                    problems.add(where, "must be a folder path")
                else:
                    output_dir = value
            elif key in _CHECKED.get(section, {}):
                message = _CHECKED[section][key](value)
                if message:
                    problems.add(where, message)
            elif key in renames and renames[key] in groups:
                if key == "max_grad_norm" and value is None:  # transformers: no clipping
                    value = 0.0
                put(renames[key], value, where)
            elif key in own:
                put(key, value, where)
            else:
                problems.add(where, _unknown(section, str(key), known))
    if method == "distillation":
        origin.update(_teacher(raw.get("teacher"), put, problems))
    problems.raise_any()
    return Layout(method, backend, output_dir, spec, origin)


def _peft(value: Any, where: str, put, problems: _Problems) -> None:
    if not isinstance(value, dict):
        problems.add(where, "must be a mapping (r, lora_alpha, lora_dropout, target_modules)")
        return
    for key, v in value.items():
        path = f"{where}.{key}"
        if key in PEFT_RENAMES:
            put(PEFT_RENAMES[key], v, path)
        elif key == "target_modules":
            _targets(v, path, put, problems)
        else:
            problems.add(path, _unknown(where, str(key), [*PEFT_RENAMES, "target_modules"]))


def _targets(value: Any, where: str, put, problems: _Problems) -> None:
    """target_modules as the training client's switches: each group all in or all out."""
    groups = ", ".join(f"{'/'.join(m)}" for m in TARGET_SWITCHES.values())
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        problems.add(where, f"must be a list of layer names ({groups})")
        return
    names = set(value)
    known = {m for modules in TARGET_SWITCHES.values() for m in modules}
    if names - known:
        problems.add(where, f"{', '.join(sorted(names - known))}: not a layer a job adapts "
                     f"({groups})")
        return
    for switch, modules in TARGET_SWITCHES.items():
        given = names & set(modules)
        if given and given != set(modules):
            problems.add(where, f"{', '.join(sorted(given))} without "
                         f"{', '.join(m for m in modules if m not in given)}: a job adapts "
                         f"{'/'.join(modules)} together ({switch}), as Tinker's training "
                         "client does")
            return
    for switch, modules in TARGET_SWITCHES.items():
        put(switch, bool(names & set(modules)), where)


def _teacher(value: Any, put, problems: _Problems) -> dict[str, str]:
    """Put the teacher section; returns the origins of its renamed keys."""
    from tuneforge.jobs.distill import Teacher

    if value is None:
        problems.add("teacher", "required for method distillation (teacher.model at least)")
        return {}
    if not isinstance(value, dict):
        problems.add("teacher", "must be a mapping of options")
        return {}
    known = [*Teacher.model_fields, *TEACHER_RENAMES]
    out: dict[str, Any] = {}
    renamed = {}
    for key, v in value.items():
        option = TEACHER_RENAMES.get(key, key)
        if option not in Teacher.model_fields:
            problems.add(f"teacher.{key}", _unknown("teacher", str(key), known))
        elif option in out:
            problems.add(f"teacher.{key}", f"the same option as teacher.{option}; give one")
        else:
            out[option] = v
            if option != key:
                renamed[f"teacher.{option}"] = f"teacher.{key}"
    put("teacher", out, "teacher")
    return renamed


def _only(allowed: tuple, meaning: str):
    def check(value: Any) -> str | None:
        return None if value in allowed else f"{value!r} is not offered: {meaning}"
    return check


def _positive_int(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return "must be a whole number >= 1"


# the package's keys that tuneforge accepts only where they mean what it does
_CHECKED = {
    "model": {
        "model_type": _only(("causal_lm",), "jobs train decoder-only models (causal_lm)"),
        "use_peft": _only((True,), "jobs train LoRA adapters only (use_peft: true)"),
    },
    "data": {
        "prompt_template": _only(("chat",), "rows are written with the base model's own chat "
                                 "template (chat; the renderer option picks another)"),
    },
    "training": {
        "logging_steps": _positive_int,  # every step is logged (metrics.jsonl) anyway
    },
}


def package_error(error: UserError, layout: Layout) -> UserError:
    """`error` (about the translated spec) with each option named by the package's key."""

    def name(option: str) -> str:
        head, _, rest = option.partition(".")
        if option in layout.origin:
            return layout.origin[option]
        if head == "teacher" and rest:
            return f"teacher.{rest}"
        # an option not given (e.g. a required one) is named where the package would write it
        return layout.origin.get(head) or PACKAGE_NAMES.get(option, option)

    if error.fields:
        fields = [{**f, "field": name(f["field"])} for f in error.fields]
        message = error.message
        if message.startswith("invalid job config: "):
            message = "invalid job config: " + "; ".join(
                f"{f['field']}: {f['message']}" for f in fields[:8])
        else:
            first = error.fields[0]["field"]
            if message.startswith(f"{first}: "):
                message = f"{name(first)}: " + message[len(first) + 2:]
        return UserError(message, fields=fields)
    option, sep, rest = error.message.partition(": ")
    if sep and " " not in option and option:
        return UserError(f"{name(option)}: {rest}")
    return error


def mapping_table() -> str:
    """`MAPPING` as a Markdown table."""
    rows = ["| the package's config | tuneforge | for |", "|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows += [f"| `{cell(a)}` | {cell(b)} | {c} |" for a, b, c in MAPPING]
    return "\n".join(rows)
