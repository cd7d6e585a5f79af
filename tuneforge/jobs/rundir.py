"""The experiment folder of a job: everything a run produces lands here.

    config.yaml            the resolved config (learning rate filled in)
    log.txt                what happened, line by line
    metrics.jsonl          one row per step (and per evaluation)
    checkpoints.jsonl      one row per saved state: step, epoch, tinker:// path, loop state
    training_history.json  per-epoch train / eval loss
    eval_report.json       the final evaluation (loss, perplexity, accuracy, BLEU/ROUGE, samples)
    adapter/               the final (best) adapter in PEFT layout
    result.json            the summary

Job types add their own files (a distillation job its teacher's data, an atomic batch one folder
per task under tasks/). Appends are line-buffered JSON and whole files are written to a temporary
name and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tuneforge.jobs.spec import spec_to_dict


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class RunDir:
    """An experiment folder (see the module docstring)."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._lock = threading.Lock()

    def log(self, message: str) -> None:
        line = f"{now()} {message}"
        with self._lock, (self.path / "log.txt").open("a") as f:
            f.write(line + "\n")
        if self.echo:
            self.echo(line)

    def _append(self, name: str, row: dict) -> None:
        with self._lock, (self.path / name).open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def metric(self, row: dict) -> None:
        self._append("metrics.jsonl", {"time": now(), **row})

    def checkpoint(self, row: dict) -> None:
        self._append("checkpoints.jsonl", {"time": now(), **row})

    def rows(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        return out

    def last_checkpoint(self) -> dict | None:
        rows = [r for r in self.rows("checkpoints.jsonl") if r.get("state_path")]
        return rows[-1] if rows else None

    def write(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_rows(self, name: str, rows: list[dict]) -> None:
        """A whole JSONL file at once (written aside, then renamed)."""
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(target)

    def write_config(self, spec) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))

    def history(self) -> list[dict]:
        path = self.path / "training_history.json"
        return json.loads(path.read_text()) if path.exists() else []
