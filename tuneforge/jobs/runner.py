"""Running a job: the experiment folder, the shared training loop, and the dispatch by type.

A job talks to a tuneforge server only through the `tinker` SDK, exactly like a user's script.
Everything it produces lands in its experiment folder:

    config.yaml            the resolved config (learning rate filled in)
    log.txt                what happened, line by line
    metrics.jsonl          one row per step (and per evaluation)
    checkpoints.jsonl      one row per saved state: step, epoch, tinker:// path, loop state
    training_history.json  per-epoch train / eval loss
    eval_report.json       the final evaluation (loss, perplexity, accuracy, BLEU/ROUGE, samples)
    adapter/               the final (best) adapter in PEFT layout
    result.json            the summary

A job restarted on the same folder continues from its last checkpoint (weights and optimizer
state, step, early-stopping state, history), so a server restart loses at most `save_every` steps.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tinker
import yaml
from tinker import types

from tuneforge.errors import UserError
from tuneforge.jobs.spec import spec_to_dict


class Cancelled(Exception):
    """The job was cancelled, or the server is stopping (then it resumes on restart)."""


def _now() -> str:
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
        line = f"{_now()} {message}"
        with self._lock, (self.path / "log.txt").open("a") as f:
            f.write(line + "\n")
        if self.echo:
            self.echo(line)

    def _append(self, name: str, row: dict) -> None:
        with self._lock, (self.path / name).open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def metric(self, row: dict) -> None:
        self._append("metrics.jsonl", {"time": _now(), **row})

    def checkpoint(self, row: dict) -> None:
        self._append("checkpoints.jsonl", {"time": _now(), **row})

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

    def write_config(self, spec) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    started: float = field(default_factory=time.monotonic)
    first_step: int = 0  # steps already done when this process started (resume)

    def snapshot(self) -> dict:
        frac = self.step / self.total_steps if self.total_steps else 0.0
        done_here = self.step - self.first_step
        eta = None
        if done_here > 0 and self.total_steps:
            eta = (time.monotonic() - self.started) / done_here * (self.total_steps - self.step)
        return {"progress": round(min(frac, 1.0), 4), "step": self.step,
                "total_steps": self.total_steps, "epoch": self.epoch, "loss": self.loss,
                "eta_seconds": None if eta is None else round(eta, 1)}


@dataclass
class JobContext:
    """What a running job needs: the spec, its folder, the SDK and the way to report."""

    spec: Any
    run: RunDir
    service: tinker.ServiceClient
    rest: tinker.RestClient | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[dict], None] | None = None
    progress: Progress = field(default_factory=Progress)
    base_url: str | None = None
    api_key: str | None = None

    @classmethod
    def connect(cls, spec, run: RunDir, base_url: str, api_key: str | None,
                **kw) -> JobContext:
        return cls(spec=spec, run=run,
                   service=tinker.ServiceClient(base_url=base_url, api_key=api_key),
                   rest=tinker.RestClient(base_url=base_url, api_key=api_key),
                   base_url=base_url, api_key=api_key, **kw)

    def close(self, status: str) -> None:
        """End this context's SDK session: the server frees its training models and samplers
        (an unfinished session would hold them, and count against the key's model cap)."""
        try:
            self.service.close(status).result(timeout=60)
        except Exception:  # the server may be gone (stopping); nothing is lost
            pass

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def report(self) -> None:
        if self.on_progress:
            self.on_progress(self.progress.snapshot())

    def child(self, spec, path: Path, progress: Progress) -> JobContext:
        """A context for one part of this job (an atomic task) with its own SDK session, so
        the part's models are freed when it closes (this context must come from `connect`)."""
        return JobContext.connect(spec, RunDir(path), self.base_url, self.api_key,
                                  cancel=self.cancel, progress=progress)


# ---- model facts ---------------------------------------------------------------------------------


def default_learning_rate(base_model: str, info: types.GetInfoResponse | None) -> float:
    """The cookbook's LoRA learning-rate formula (`hyperparam_utils.get_lr`): 5e-4 scaled by
    (2000 / hidden_size) ** e with e = 0.781 for Llama-family and 0.0775 for Qwen-family models.
    The family and hidden size come from the cookbook's tables, else from the served model's
    config.json (so built-in and local models work offline)."""
    from tinker_cookbook import hyperparam_utils

    try:
        return float(hyperparam_utils.get_lr(base_model, is_lora=True))
    except Exception:
        pass
    config = {}
    tok = getattr(getattr(info, "model_data", None), "tokenizer_id", None)
    if tok and (Path(tok) / "config.json").is_file():
        config = json.loads((Path(tok) / "config.json").read_text())
    kind = str(config.get("model_type", "")).lower()
    hidden = config.get("hidden_size")
    exponent = 0.781 if "llama" in kind else 0.0775 if "qwen" in kind else None
    if exponent is None or not hidden:
        raise UserError(f"learning_rate: no default for base model {base_model!r} (the get_lr "
                        "formula covers Llama and Qwen families); set learning_rate")
    return 5e-4 * (2000 / int(hidden)) ** exponent


def renderer_for(spec, tc):
    """(name, renderer) of a job: its `renderer` option, else chosen from the base model, over
    a tokenizer object of the caller's own (fast tokenizers must not be shared between threads
    — concurrent use fails with "Already borrowed" — and the SDK caches one per model)."""
    import copy

    return pick_renderer(getattr(spec, "renderer", None), spec.base_model,
                         copy.deepcopy(tc.get_tokenizer()))


def pick_renderer(name: str | None, base_model: str, tokenizer):
    from tinker_cookbook import model_info, renderers

    if name is None:
        try:
            name = model_info.get_recommended_renderer_name(base_model)
        except Exception:
            # ChatML special tokens (Qwen3, SmolLM2, the built-in models): the Qwen3 instruct
            # renderer writes exactly that format; anything else falls back to plain text.
            name = "qwen3_instruct" if "<|im_start|>" in tokenizer.get_vocab() else "role_colon"
    try:
        return name, renderers.get_renderer(name, tokenizer)
    except Exception as e:
        raise UserError(f"renderer: {name!r} is not available ({e})") from None


def lr_at(spec, base_lr: float, step: int, total: int) -> float:
    if spec.lr_schedule == "linear" and total > 0:
        return base_lr * max(0.0, 1.0 - step / total)
    return base_lr


def adam(lr: float) -> types.AdamParams:
    return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)


def download_adapter(ctx: JobContext, tc, name: str, to: Path) -> Path:
    """Save the adapter as external weights and download it (PEFT layout) into `to`."""
    saved = tc.save_weights_external(name).result()
    urls = ctx.rest.get_external_weights_urls(saved.path).result().urls
    tmp = to.with_name(f".{to.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=300) as http:
        for rel, url in urls.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            answer = http.get(url)
            answer.raise_for_status()
            target.write_bytes(answer.content)
    if to.exists():
        import shutil

        shutil.rmtree(to)
    os.replace(tmp, to)
    return to


# ---- the shared loop ---------------------------------------------------------------------------


@dataclass
class LoopResult:
    tc: Any
    final_path: str  # sampler weights of the adapter kept (the best one when evaluated)
    state_path: str
    steps: int
    epochs_trained: int
    early_stopped: bool
    best_epoch: int | None
    best_eval: float | None
    base_lr: float
    best_state: str | None = None  # set when the kept adapter is not the last one


def train_loop(ctx: JobContext, n_train: int, step_fn, eval_fn=None, *, maximize: bool = False,
               eval_name: str = "eval_loss", train_key: str = "loss", setup=None,
               tag: str = "") -> LoopResult:
    """Epochs of shuffled batches with evaluation, checkpoints, early stopping and resume.

    `setup(tc)` runs once the training client exists (before any step); `step_fn(tc, indices,
    lr) -> dict` runs one optimizer step on those training rows and returns metrics including
    `train_key`; `eval_fn(tc) -> dict` returns metrics including `eval_name`, where lower is
    better unless `maximize`."""
    spec, run = ctx.spec, ctx.run
    steps_per_epoch = math.ceil(n_train / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    resume = run.last_checkpoint()
    if resume:
        tc = ctx.service.create_training_client_from_state_with_optimizer(
            resume["state_path"]).result()
        loop = resume["loop"]
        run.log(f"{tag}resumed from step {loop['step']} ({resume['state_path']})")
    else:
        if spec.load_checkpoint_path:
            tc = ctx.service.create_training_client_from_state(spec.load_checkpoint_path).result()
            run.log(f"{tag}starting from {spec.load_checkpoint_path}")
        else:
            tc = ctx.service.create_lora_training_client(
                base_model=spec.base_model, rank=spec.lora_rank, seed=spec.seed).result()
        loop = {"step": 0, "best": None, "best_step": None, "best_epoch": None, "bad_evals": 0,
                "best_sampler": None, "best_state": None, "history": [], "epoch_losses": [],
                "last_eval": None, "stopped": False, "base_lr": None}
    if loop["base_lr"] is None:
        loop["base_lr"] = spec.learning_rate or default_learning_rate(spec.base_model,
                                                                      tc.get_info())
        run.log(f"{tag}learning rate {loop['base_lr']:.3g}"
                + ("" if spec.learning_rate else " (get_lr formula)"))
    if not (run.path / "model.json").exists():
        info = tc.get_info()
        run.write("model.json", {"base_model": spec.base_model,
                                 "tokenizer_id": info.model_data.tokenizer_id,
                                 "lora_rank": info.lora_rank})
    if setup:
        setup(tc)
    ctx.progress.total_steps, ctx.progress.step = total, loop["step"]
    ctx.progress.first_step = loop["step"]
    ctx.report()

    def better(value: float) -> bool:
        if loop["best"] is None:
            return True
        gain = value - loop["best"] if maximize else loop["best"] - value
        return gain > spec.min_delta

    def save(reason: str) -> None:
        path = tc.save_state(f"step-{loop['step']:06d}").result().path
        run.checkpoint({"step": loop["step"], "epoch": loop["step"] // steps_per_epoch,
                        "reason": reason, "state_path": path, "loop": loop})

    step = loop["step"]
    while step < total and not loop["stopped"]:
        ctx.check_cancel()
        epoch, b = divmod(step, steps_per_epoch)
        order = list(range(n_train))
        random.Random(spec.seed * 1_000_003 + epoch).shuffle(order)
        indices = order[b * spec.batch_size:(b + 1) * spec.batch_size]
        lr = lr_at(spec, loop["base_lr"], step, total)
        metrics = step_fn(tc, indices, lr)
        step += 1
        loop["step"] = step
        loop["epoch_losses"].append(metrics[train_key])
        run.metric({"step": step, "epoch": epoch + 1, "lr": lr, **metrics})
        ctx.progress.step, ctx.progress.epoch = step, epoch + 1
        ctx.progress.loss = metrics.get("loss")
        end_of_epoch = b == steps_per_epoch - 1
        if eval_fn and ((spec.eval_every and step % spec.eval_every == 0)
                        or (not spec.eval_every and end_of_epoch)):
            ev = eval_fn(tc)
            value = ev[eval_name]
            run.metric({"step": step, "epoch": epoch + 1, **ev})
            loop["last_eval"] = value
            if better(value):
                loop.update(best=value, best_step=step, best_epoch=epoch + 1, bad_evals=0)
                loop["best_state"] = tc.save_state(f"best-{step:06d}").result().path
                loop["best_sampler"] = tc.save_weights_for_sampler(
                    f"best-{step:06d}").result().path
            else:
                loop["bad_evals"] += 1
                if spec.patience and loop["bad_evals"] >= spec.patience:
                    loop["stopped"] = True
                    run.log(f"{tag}early stop at step {step} (epoch {epoch + 1}): {eval_name} "
                            f"did not improve by more than {spec.min_delta} in "
                            f"{spec.patience} evaluation(s); best {loop['best']:.4f} at epoch "
                            f"{loop['best_epoch']}")
        if end_of_epoch or loop["stopped"]:
            losses = loop["epoch_losses"]
            loop["history"].append({"epoch": epoch + 1, "step": step,
                                    f"train_{train_key}": sum(losses) / len(losses),
                                    eval_name: loop["last_eval"]})
            loop["epoch_losses"] = []
            run.write("training_history.json", loop["history"])
        if ((spec.save_every and step % spec.save_every == 0)
                or (not spec.save_every and end_of_epoch) or loop["stopped"] or step == total):
            save("end" if step == total or loop["stopped"] else "periodic")
        ctx.report()
    final = loop["best_sampler"] or tc.save_weights_for_sampler(f"final-{step:06d}").result().path
    last_state = run.last_checkpoint()
    epochs_trained = math.ceil(step / steps_per_epoch)
    return LoopResult(tc=tc, final_path=final, state_path=last_state["state_path"], steps=step,
                      epochs_trained=epochs_trained, early_stopped=loop["stopped"],
                      best_epoch=loop["best_epoch"], best_eval=loop["best"],
                      best_state=loop["best_state"] if loop["best_step"] != step else None,
                      base_lr=loop["base_lr"])


def finish_adapter(ctx: JobContext, result: LoopResult) -> Path:
    """Export the kept adapter (the best evaluated one, else the last) in PEFT layout."""
    tc = result.tc
    if result.best_state:
        tc = ctx.service.create_training_client_from_state(result.best_state).result()
    return download_adapter(ctx, tc, f"export-{result.steps:06d}", ctx.run.path / "adapter")


def conclude(ctx: JobContext, result: LoopResult, evaluator, examples: list[dict],
             held_out: bool, key: str = "loss", more=None) -> dict:
    """The end of a job: export the kept adapter, evaluate it on `examples` (written to
    eval_report.json; `more(report)` may add to it) and summarise the run."""
    adapter = finish_adapter(ctx, result)
    sampler = ctx.service.create_sampling_client(model_path=result.final_path).result()
    report = evaluator.report(sampler, examples)
    report["split"] = "held-out" if held_out else "train"
    if more:
        more(report)
    ctx.run.write("eval_report.json", report)
    values = [r[key] for r in ctx.run.rows("metrics.jsonl") if key in r]
    name = "train_loss" if key == "loss" else key
    return {"steps": result.steps, "epochs_trained": result.epochs_trained,
            "early_stopped": result.early_stopped, "best_epoch": result.best_epoch,
            "learning_rate": result.base_lr, f"first_{name}": values[0],
            f"last_{name}": values[-1], "sampler_path": result.final_path,
            "state_path": result.state_path, "adapter": str(adapter), "eval": report}


def preflight(spec) -> None:
    """Everything that can be checked before a job runs: data rows, grader, teacher context,
    the task list. Raises UserError naming the field (and file:line) at fault."""
    from tuneforge.jobs import data, rl

    if spec.type == "atomic":
        data.load_tasks(spec.tasks)
    else:
        data.load_examples(spec.type, spec.data)
        if spec.eval_data is not None:
            data.load_examples(spec.type, spec.eval_data, "eval_data")
    if spec.type == "rl":
        rl.load_grader(spec.grader, spec.format_bonus)
    if spec.type == "distill" and spec.teacher.skill_file:
        if not Path(spec.teacher.skill_file).is_file():
            raise UserError(f"teacher.skill_file: no such file {spec.teacher.skill_file}")


def run_job(ctx: JobContext) -> dict:
    """Run (or continue) the job in `ctx` to the end; return its summary."""
    from tuneforge.jobs import atomic, dpo, rl, sft

    kind = ctx.spec.type
    started = time.monotonic()
    ctx.run.write_config(ctx.spec)
    ctx.run.log(f"{kind} job {ctx.spec.name or ''} on {ctx.spec.base_model} started")
    runner = {"sft": sft.run, "distill": sft.run_distill, "dpo": dpo.run, "rl": rl.run,
              "atomic": atomic.run}[kind]
    summary = runner(ctx)
    summary = {"type": kind, "name": ctx.spec.name, "base_model": ctx.spec.base_model,
               "wall_seconds": round(time.monotonic() - started, 2), **summary}
    ctx.run.write("result.json", summary)
    ctx.run.log(f"{kind} job finished")
    return summary
