"""Evaluating a finished (or running) job's adapter after the fact, optionally against a
baseline: the base model or another job's adapter, in one table."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.errors import UserError
from tuneforge.jobs import data, evaluate
from tuneforge.jobs.runner import JobContext, RunDir, pick_renderer
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
    if raw["type"] == "atomic" and task is None:
        raise UserError("task: an atomic job has one adapter per task; name the task")
    run_folder, sampler_path = _adapter_of(folder, task)
    spec = parse_spec(yaml.safe_load((run_folder / "config.yaml").read_text()))
    if samples is not None:
        spec = spec.model_copy(update={"eval_samples": samples})
    model = json.loads((run_folder / "model.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model["tokenizer_id"])
    ctx = JobContext(spec=spec, run=RunDir(run_folder), service=service)
    evaluator, examples = _evaluator(ctx, run_folder, data_source)
    _, evaluator.renderer = pick_renderer(getattr(spec, "renderer", None), spec.base_model,
                                          tokenizer)
    job_report = evaluator.report(service.create_sampling_client(model_path=sampler_path).result(),
                                  examples)
    out = {"adapter": sampler_path, "examples": len(examples), "report": job_report}
    if baseline:
        if baseline == "base":
            other = service.create_sampling_client(base_model=spec.base_model).result()
            name = f"base ({spec.base_model})"
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


def _evaluator(ctx: JobContext, folder: Path, data_source):
    from tuneforge.jobs import dpo, rl, sft

    spec = ctx.spec
    kind = spec.type
    if kind == "distill":
        if data_source is not None:
            raise UserError("data: a distillation job is evaluated on its teacher's held-out "
                            "answers; evaluate it with an sft-shaped file via a new job")
        rows = [json.loads(line) for line in (folder / "teacher_data.jsonl").read_text()
                .splitlines()]
        held = [r for r in rows if r["held_out"]] or rows[: max(spec.eval_samples, 1)]
        return sft.Supervised(ctx, [], []), [{"messages": r["messages"], "meta": {}}
                                             for r in held]
    if data_source is not None:
        examples = data.load_examples(kind, data_source)
    else:
        train, held_out = sft.load_split(spec, kind)
        examples = held_out or train
    if kind == "sft":
        return sft.Supervised(ctx, [], [], spec.train_on), examples
    if kind == "dpo":
        return dpo.Preference(ctx, [], []), examples
    return rl.Reinforce(ctx, [], []), examples
