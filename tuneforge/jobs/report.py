"""Evaluating a finished (or running) job's adapter after the fact, optionally against a
baseline: the base model or another job's adapter, in one table."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.errors import UserError
from tuneforge.jobs import evaluate
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.model import pick_renderer, served_base
from tuneforge.jobs.registry import job_type
from tuneforge.jobs.rundir import RunDir
from tuneforge.jobs.spec import parse_spec


def _adapter_of(folder: Path, task: str | None) -> tuple[Path, str]:
    """(the run folder of the adapter, its sampler path) for a job folder (and task)."""
    if task is not None:
        folder = folder / "tasks" / task
        meta = folder / "metadata.json"
        if not meta.exists():
            raise UserError(f"task: no task {task!r} in this job")
        path = json.loads(meta.read_text()).get("sampler_path")
    else:
        result = folder / "result.json"
        path = json.loads(result.read_text()).get("sampler_path") if result.exists() else None
    if not path:
        raise UserError("the job has no trained adapter yet (evaluate after it completes)")
    return folder, path


def evaluate_run(service, folder: Path, *, data_source=None, baseline: str | None = None,
                 baseline_folder: Path | None = None, task: str | None = None,
                 samples: int | None = None) -> dict:
    folder = Path(folder)
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    if job_type(raw["type"]).has_tasks and task is None:
        raise UserError(f"task: an {raw['type']} job has one adapter per task; name the task")
    run_folder, sampler_path = _adapter_of(folder, task)
    spec = parse_spec(yaml.safe_load((run_folder / "config.yaml").read_text()))
    if samples is not None:
        spec = spec.model_copy(update={"eval_samples": samples})
    model = json.loads((run_folder / "model.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model["tokenizer_id"])
    ctx = JobContext(spec=spec, run=RunDir(run_folder), service=service)
    evaluator, examples = job_type(spec.type).evaluator(ctx, run_folder, data_source)
    _, evaluator.renderer = pick_renderer(spec.renderer, spec.base_model, tokenizer)
    job_report = evaluator.report(service.create_sampling_client(model_path=sampler_path).result(),
                                  examples)
    out = {"adapter": sampler_path, "examples": len(examples), "report": job_report}
    if baseline:
        if baseline == "base":
            # the weights the adapter sits on: the quantized copy when the job trained on one
            other = service.create_sampling_client(base_model=served_base(spec)).result()
            name = f"base ({served_base(spec)})"
        else:
            b_folder, b_path = _adapter_of(baseline_folder, None)
            b_model = json.loads((b_folder / "model.json").read_text())["base_model"]
            if b_model != spec.base_model:
                raise UserError(f"baseline: job {baseline} trained {b_model}, this job "
                                f"{spec.base_model}; compare adapters of one base model")
            other = service.create_sampling_client(model_path=b_path).result()
            name = baseline
        out["baseline"] = {"name": name, "report": evaluator.report(other, examples)}
        out["comparison"] = evaluate.compare(job_report, out["baseline"]["report"], "job", name)
    return out
