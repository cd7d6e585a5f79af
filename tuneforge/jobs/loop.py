"""The shared training loop every job type runs, and the end of a job (export, evaluation).

Epochs of seeded shuffled batches; evaluation every `eval_every` steps (or each epoch), the
best evaluated adapter kept, early stopping after `patience` evaluations without an improvement
of more than `min_delta`; checkpoints every `save_every` steps (or each epoch) that carry the
loop's own state, so a job restarted on the same folder continues from its last checkpoint
(weights and optimizer state, step, early-stopping state, history) and a server restart loses at
most `save_every` steps.

A step is one optimizer step over `batch_size x gradient_accumulation_steps` rows (the effective
batch), sent as `gradient_accumulation_steps` forward_backward calls of `batch_size` rows whose
gradients the server sums before the optim_step; steps per epoch, the learning-rate schedule,
evaluation and checkpoint intervals and progress all count optimizer steps. The summed gradient
is the one a single call over the effective batch would give: losses that are sums over rows
(cross-entropy with per-example weights, the RL losses) need nothing more, and a mean over the
call's rows (DPO) is scaled by the call's share of the step.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tinker import types

from tuneforge import quantization
from tuneforge.errors import UserError
from tuneforge.jobs.context import JobContext
from tuneforge.jobs.model import default_learning_rate, served_base


def lr_at(spec, base_lr: float, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: as transformers'
    `get_linear_schedule_with_warmup` / `get_constant_schedule_with_warmup`, the warmup being
    the first ceil(warmup_ratio x total) steps."""
    warmup = math.ceil(spec.warmup_ratio * total)
    if step < warmup:
        return base_lr * step / warmup
    if spec.lr_schedule == "linear" and total > 0:
        return base_lr * max(0.0, (total - step) / max(1, total - warmup))
    return base_lr


def adam(spec, lr: float) -> types.AdamParams:
    return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8,
                            weight_decay=spec.weight_decay, grad_clip_norm=spec.max_grad_norm)


def effective_batch(spec) -> int:
    """Rows per optimizer step: batch_size rows in each of gradient_accumulation_steps calls."""
    return spec.batch_size * spec.gradient_accumulation_steps


def micro_batches(spec, items: list) -> list[list]:
    """An optimizer step's rows as the forward_backward calls that send them: batch_size each
    (the last one of an epoch's short last step may hold fewer)."""
    return [items[i:i + spec.batch_size] for i in range(0, len(items), spec.batch_size)]


def _check_checkpoint_base(spec, tc) -> None:
    """A checkpoint trains on the base it was saved from; a job that asks for a quantization the
    checkpoint's base does not have would silently train on other weights, so it is refused."""
    if spec.quantization == "none":
        return  # the checkpoint's own base, whatever it is (as before quantized bases existed)
    name = getattr(tc.get_info(), "model_name", None)
    if not name:
        return
    try:
        _, has = quantization.split(name)
    except UserError:  # an "@" of the name's own, not a quantization
        has = None
    if has != spec.quantization:
        message = (f"the checkpoint was trained on {name}, not on a {spec.quantization} base; "
                   f"this job asks for {served_base(spec)} (drop quantization, or start from a "
                   f"checkpoint of a {spec.quantization} run)")
        raise UserError(f"load_checkpoint_path: {message}",
                        fields=[{"field": "load_checkpoint_path", "message": message},
                                {"field": "quantization", "message": message}])


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


def _training_client(ctx: JobContext, tag: str):
    """(training client, loop state): resumed from the folder's last checkpoint, else new."""
    spec, run, meta = ctx.spec, ctx.run, ctx.user_metadata
    resume = run.last_checkpoint()
    if resume:
        tc = ctx.service.create_training_client_from_state_with_optimizer(
            resume["state_path"], user_metadata=meta).result()
        run.log(f"{tag}resumed from step {resume['loop']['step']} ({resume['state_path']})")
        return tc, resume["loop"]
    if spec.load_checkpoint_path:
        tc = ctx.service.create_training_client_from_state(spec.load_checkpoint_path,
                                                           user_metadata=meta).result()
        _check_checkpoint_base(spec, tc)
        run.log(f"{tag}starting from {spec.load_checkpoint_path}")
    else:
        tc = ctx.service.create_lora_training_client(
            base_model=served_base(spec), rank=spec.lora_rank, seed=spec.seed,
            train_mlp=spec.train_mlp, train_attn=spec.train_attn,
            train_unembed=spec.train_unembed, user_metadata=meta).result()
    return tc, {"step": 0, "best": None, "best_step": None, "best_epoch": None, "bad_evals": 0,
                "best_sampler": None, "best_state": None, "history": [], "epoch_losses": [],
                "last_eval": None, "stopped": False, "base_lr": None}


def train_loop(ctx: JobContext, n_train: int | Callable[[], int], step_fn, eval_fn=None, *,
               maximize: bool = False, eval_name: str = "eval_loss", train_key: str = "loss",
               setup=None, tag: str = "") -> LoopResult:
    """Epochs of shuffled batches with evaluation, checkpoints, early stopping and resume.

    `setup(tc)` runs once the training client exists (before any step); `n_train` is the number
    of training rows, or a function giving it once `setup` has run (when setup makes the rows);
    `step_fn(tc, indices, lr) -> dict` runs one optimizer step on those training rows (the
    effective batch; `micro_batches` splits it into its forward_backward calls) and returns
    metrics including `train_key`; `eval_fn(tc) -> dict` returns metrics including
    `eval_name`, where lower is better unless `maximize`."""
    spec, run = ctx.spec, ctx.run
    tc, loop = _training_client(ctx, tag)
    if loop["base_lr"] is None:
        if spec.learning_rate:
            loop["base_lr"], how = spec.learning_rate, ""
        else:
            scale = spec.learning_rate_scale or 1.0
            loop["base_lr"] = scale * default_learning_rate(spec.base_model, tc.get_info())
            how = f" ({scale:g} x the get_lr formula)" if scale != 1.0 else " (get_lr formula)"
        run.log(f"{tag}learning rate {loop['base_lr']:.3g}{how}")
    if not (run.path / "model.json").exists():
        info = tc.get_info()
        run.write("model.json", {"base_model": spec.base_model,
                                 "quantization": spec.quantization,
                                 "tokenizer_id": info.model_data.tokenizer_id,
                                 "lora_rank": info.lora_rank})
    if setup:
        setup(tc)
    n_train = n_train() if callable(n_train) else n_train
    per_step = effective_batch(spec)
    steps_per_epoch = math.ceil(n_train / per_step)
    total = steps_per_epoch * spec.epochs
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
        indices = order[b * per_step:(b + 1) * per_step]
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
        shutil.rmtree(to)
    os.replace(tmp, to)
    return to


def finish_adapter(ctx: JobContext, result: LoopResult) -> Path:
    """Export the kept adapter (the best evaluated one, else the last) in PEFT layout."""
    tc = result.tc
    if result.best_state:
        tc = ctx.service.create_training_client_from_state(
            result.best_state, user_metadata=ctx.user_metadata).result()
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
