"""Job data: JSONL rows read and checked row by row, with the file and line in every error.

Row shapes, by job type:
  sft      {"prompt": str, "response": str, ...metadata} or {"messages": [{"role", "content"}]}
  dpo      {"prompt": str | messages, "chosen": str, "rejected": str}
  rl       {"prompt": str | messages, "answer": str | number}
  distill  {"prompt": str | messages}
Other fields (e.g. `grade`, `topic_tags`) are kept as metadata and copied into reports.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_ROWS = 1_000_000


def read_rows(source: str | list, what: str = "data") -> list[dict]:
    """Rows from a JSONL path or an inline list."""
    if isinstance(source, list):
        rows = source
        where = [f"{what}[{i}]" for i in range(len(rows))]
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{what}: no such file {path}")
        rows, where = [], []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{what}: {path}:{n}: not valid JSON ({e.msg})") from None
                where.append(f"{path}:{n}")
                if len(rows) > MAX_ROWS:
                    raise UserError(f"{what}: more than {MAX_ROWS} rows")
    out = []
    for row, loc in zip(rows, where, strict=True):
        if not isinstance(row, dict):
            raise UserError(f"{what}: {loc}: each row must be a JSON object")
        out.append({**row, "_where": loc})
    rows = out
    if not rows:
        raise UserError(f"{what}: no rows")
    return rows


def _messages(value: Any, loc: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{loc}: {field} must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)):
            raise UserError(f"{loc}: {field}[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                            "'content': str}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise UserError(f"{row['_where']}: '{field}' must be a string")
    return value


def metadata(row: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in used and not k.startswith("_")}


def sft_example(row: dict) -> dict:
    """{"messages", "meta"} for a supervised row."""
    loc = row["_where"]
    if "messages" in row:
        msgs = _messages(row["messages"], loc, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{loc}: messages need at least one assistant message")
        return {"messages": msgs, "meta": metadata(row, ("messages",))}
    if "prompt" not in row or "response" not in row:
        raise UserError(f"{loc}: a supervised row needs 'prompt' and 'response', or 'messages'")
    msgs = [*_messages(row["prompt"], loc, "prompt"),
            {"role": "assistant", "content": _text(row, "response")}]
    if isinstance(row.get("system"), str):
        msgs.insert(0, {"role": "system", "content": row["system"]})
    return {"messages": msgs, "meta": metadata(row, ("prompt", "response", "system"))}


def dpo_example(row: dict) -> dict:
    loc = row["_where"]
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise UserError(f"{loc}: a preference row needs 'prompt', 'chosen' and 'rejected'")
    return {"prompt": _messages(row["prompt"], loc, "prompt"), "chosen": _text(row, "chosen"),
            "rejected": _text(row, "rejected"),
            "meta": metadata(row, ("prompt", "chosen", "rejected"))}


def rl_example(row: dict) -> dict:
    loc = row["_where"]
    if "prompt" not in row or "answer" not in row:
        raise UserError(f"{loc}: an RL row needs 'prompt' and 'answer'")
    answer = row["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise UserError(f"{loc}: 'answer' must be a string or a number")
    return {"prompt": _messages(row["prompt"], loc, "prompt"), "answer": str(answer),
            "meta": metadata(row, ("prompt", "answer"))}


def prompt_example(row: dict) -> dict:
    loc = row["_where"]
    if "prompt" not in row:
        raise UserError(f"{loc}: a distillation row needs 'prompt'")
    return {"prompt": _messages(row["prompt"], loc, "prompt"),
            "meta": metadata(row, ("prompt",))}


def load_examples(kind: str, source, what: str = "data") -> list[dict]:
    """The rows of `source` as job type `kind` reads them."""
    from tuneforge.jobs.registry import job_type  # it imports the job types, which import this

    return job_type(kind).examples(source, what)


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` held out (at least one row when > 0)."""
    if not fraction:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise UserError(f"eval_split {fraction} leaves no training rows out of {len(examples)}")
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def load_tasks(source) -> list[dict]:
    """Atomic tasks: [{"name", "data", ...overrides}] from a folder of JSONL files or a list."""
    if isinstance(source, str) and Path(source).is_dir():
        files = sorted(Path(source).glob("*.jsonl"))
        if not files:
            raise UserError(f"tasks: no *.jsonl files in {source}")
        return [{"name": f.stem, "data": str(f)} for f in files]
    rows = read_rows(source, "tasks")
    tasks, seen = [], set()
    base = Path(source).parent if isinstance(source, str) else None
    for row in rows:
        name, data = row.get("name"), row.get("data")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise UserError(f"{row['_where']}: each task needs a 'name' (a plain file name)")
        if name in seen:
            raise UserError(f"{row['_where']}: task name {name!r} repeats")
        seen.add(name)
        if isinstance(data, str) and base is not None and not Path(data).is_absolute():
            data = str(base / data)
        if not isinstance(data, (str, list)):
            raise UserError(f"{row['_where']}: task {name!r} needs 'data' (a path or rows)")
        tasks.append({**{k: v for k, v in row.items() if not k.startswith("_")}, "data": data})
    return tasks


def plain_rows(rows: list[dict]) -> list[dict]:
    """Rows as given (without the file:line each carries after `read_rows`)."""
    return [{k: v for k, v in r.items() if k != "_where"} for r in rows]


def inline_files(spec):
    """The spec with every file it names replaced by its content (data rows, task rows, the
    teacher's skill file as its system prompt), so it can run on a server that cannot see them.
    A Python grader stays a reference: code is not shipped."""
    from tuneforge.jobs.registry import job_type

    return job_type(spec.type).inline(spec)


def named_files(spec) -> list[tuple[str, str]]:
    """(field, path) for every server file the spec names."""
    from tuneforge.jobs.registry import job_type

    return job_type(spec.type).named_files(spec)
