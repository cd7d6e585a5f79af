"""`tuneforge train` and `tuneforge jobs ...`: the command-line face of the job layer.

The job layer is a client of the server: `tuneforge train` without --url runs against a server
that the caller (tuneforge/cli.py) starts in this process and hands in as `embedded`. A config in
the math-tutoring package's layout (jobs/layouts.py) says where it runs with `backend`: local is
the embedded server, tinker the server at TINKER_BASE_URL (--url wins over both). With
--experiments the results also land in that package's experiment folders (jobs/experiments.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tuneforge.errors import UserError


def add_parsers(sub) -> None:
    train = sub.add_parser(
        "train", help="run a job config (YAML) to the end, with a progress bar",
        description="Validate and run a job config. Without --url an embedded server is started "
        "in this process on the data directory; with --url the job runs here against that "
        "server. Results go to the experiment folder (--out).")
    train.add_argument("config", type=Path, help="the job's YAML (or JSON) file")
    train.add_argument("--out", type=Path, help="experiment folder (default "
                       "./experiments/NAME-TIMESTAMP)")
    train.add_argument("--url", help="a running server (default: start one in this process) "
                       "[TINKER_BASE_URL]")
    train.add_argument("--api-key", help="its API key [TINKER_API_KEY]")
    train.add_argument("--data-dir", help="data directory of the embedded server (default "
                       "./data) [TUNEFORGE_DATA_DIR]")
    train.add_argument("--threads", type=int, help="torch threads of the embedded server")
    train.add_argument("--alias", action="append", metavar="NAME=MODEL", type=alias_pair,
                       help="the embedded server serves MODEL under NAME too (e.g. "
                       "qwen3:8b=tuneforge/tiny-qwen3); repeat for several "
                       "[TUNEFORGE_MODEL_ALIASES]")
    train.add_argument("--experiments", type=Path, metavar="DIR", help="also write the results "
                       "in the tutoring package's layout: DIR/sft/sft_NNN_DESCRIPTION/ (or "
                       "distillation/dist_NNN_..., rlvr/rlvr_NNN_...) with benchmark_results.json "
                       "and comparison.json against DIR/baseline/MODEL/ (made when missing)")
    train.add_argument("--description", help="the DESCRIPTION of the experiment folder "
                       "(default: the config's name)")
    train.add_argument("--check", action="store_true", help="only validate the config")

    jobs = sub.add_parser("jobs", help="start and watch jobs on a server (REST job API)")
    jobs.add_argument("--url", help="the server [TINKER_BASE_URL, default "
                      "http://127.0.0.1:8000]")
    jobs.add_argument("--api-key", help="API key [TINKER_API_KEY]")
    acts = jobs.add_subparsers(dest="action", required=True)
    submit = acts.add_parser("submit", help="start a job from a config file")
    submit.add_argument("config", type=Path)
    submit.add_argument("--no-inline", dest="inline", action="store_false",
                        help="send file paths instead of their rows (the server must see "
                        "them, inside its TUNEFORGE_JOB_FILES_DIR)")
    acts.add_parser("list", help="your jobs")
    for name, text in (("status", "a job's status"), ("cancel", "cancel a job"),
                       ("metrics", "a job's metrics (JSON)")):
        acts.add_parser(name, help=text).add_argument("job_id")
    logs = acts.add_parser("logs", help="a job's log")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    ev = acts.add_parser("evaluate", help="evaluate a job's adapter")
    ev.add_argument("job_id")
    ev.add_argument("--baseline", help="'base' (the base model) or another job id")
    ev.add_argument("--task", help="the task of an atomic job")
    ev.add_argument("--data", help="a JSONL file inside the server's job files folder "
                    "(default: the held-out split)")


def alias_pair(text: str) -> tuple[str, str]:
    """An --alias NAME=MODEL argument (`tuneforge serve` takes the same)."""
    name, sep, model = text.partition("=")
    if not sep or not name or not model:
        raise argparse.ArgumentTypeError(f"--alias {text!r}: expected NAME=MODEL")
    return name, model


# (the parsed arguments) -> a context manager giving (base URL, API key) of a server that runs
# while it is open
Embedded = Callable[[argparse.Namespace], contextlib.AbstractContextManager[tuple[str, str]]]


def main(args: argparse.Namespace, embedded: Embedded) -> int:
    try:
        return train(args, embedded) if args.command == "train" else jobs(args)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        import tinker

        if not isinstance(e, tinker.TinkerError):
            raise
        # the server refused a request of the job: its reason, without the SDK's traceback
        print(f"error: {_server_reason(e)}", file=sys.stderr)
        return 1


def _server_reason(e: Exception) -> str:
    """The server's own words in an SDK error (an HTTP error's detail, a failed request's
    message without the SDK's request id and type)."""
    import re

    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    text = str(getattr(e, "message", None) or e)
    found = re.match(r"Request failed: (.*?) for self\.request_id=", text, re.S)
    return found.group(1) if found else text


def train(args: argparse.Namespace, embedded: Embedded) -> int:
    import datetime as dt

    from tuneforge.jobs import layouts
    from tuneforge.jobs.runner import preflight
    from tuneforge.jobs.spec import load_spec, read_config

    raw = read_config(args.config)
    layout = layouts.translate(raw) if layouts.is_layout(raw) else None
    spec = load_spec(args.config)
    try:
        preflight(spec)
    except UserError as e:
        raise layouts.package_error(e, layout) if layout else e from None
    method = layout.method if layout else EXPERIMENT_METHODS.get(spec.type)
    if args.experiments and method is None:
        raise UserError(f"--experiments: the tutoring package's experiments are sft, "
                        f"distillation and rlvr; a {spec.type} job has no folder there")
    if args.experiments and args.out:
        raise UserError("give --out or --experiments, not both (an experiment folder is "
                        "DIR/KIND/KIND_NNN_DESCRIPTION)")
    url, key = server_of(args, layout)
    if args.check:
        print(f"{args.config}: valid {spec.type} job" + (f" ({method} in the tutoring package's "
                                                         "layout)" if layout else ""))
        return 0
    after = None
    if args.experiments:
        from tuneforge.jobs import experiments

        out = experiments.claim_folder(args.experiments, method,
                                       args.description or spec.name or method)

        def after(ctx, result: dict) -> None:
            comparison = experiments.write_experiment(
                ctx.service, args.experiments, out, method, ctx.spec, args.config, result,
                url or "local", echo=ctx.run.log)
            print(experiments.comparison_text(comparison))
    elif args.out:
        out = args.out
    elif layout and layout.output_dir:
        out = (args.config.parent / layout.output_dir).resolve()
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("experiments") / f"{spec.name}-{stamp}"
    if url:
        return _train(spec, out, url, key, after)
    with embedded(args) as (base_url, key):
        return _train(spec, out, base_url, key, after)


# a tuneforge job type → its experiment kind in the tutoring package's layout
EXPERIMENT_METHODS = {"sft": "sft", "distill": "distillation", "rl": "rlvr"}


def server_of(args: argparse.Namespace, layout) -> tuple[str | None, str | None]:
    """(URL, API key) of the server the job runs against; (None, None): the embedded one.
    --url wins; else a tutoring config's `backend: tinker` means TINKER_BASE_URL."""
    url = args.url
    if not url and layout is not None and layout.backend == "tinker":
        url = os.environ.get("TINKER_BASE_URL")
        if not url:
            raise UserError("backend: tinker runs the job on a Tinker-protocol server (tuneforge "
                            "serve, or the hosted service): set TINKER_BASE_URL (and "
                            "TINKER_API_KEY), or give --url; backend: local runs it here")
    if url and args.alias:
        raise UserError("--alias names models of the embedded server; this job runs on "
                        f"{url}, which has its own (tuneforge serve --alias, or "
                        "TUNEFORGE_MODEL_ALIASES there)")
    if not url:
        return None, None
    return url, args.api_key or os.environ.get("TINKER_API_KEY")


def _train(spec, out: Path, url: str, key: str | None, after=None) -> int:
    from tqdm import tqdm

    from tuneforge.jobs.context import JobContext
    from tuneforge.jobs.rundir import RunDir
    from tuneforge.jobs.runner import run_job

    bar = tqdm(total=1, unit="step", dynamic_ncols=True)

    def progress(snap: dict) -> None:
        if snap.get("total_steps"):
            bar.total = snap["total_steps"]
        bar.n = snap.get("step") or 0
        if snap.get("loss") is not None:
            bar.set_postfix(loss=f"{snap['loss']:.4f}", epoch=snap.get("epoch"))
        bar.refresh()

    ctx = JobContext.connect(spec, RunDir(out, echo=bar.write), url, key,
                             on_progress=progress)
    try:
        result = run_job(ctx)
        bar.close()  # (before the summary is printed; closing twice is harmless)
        print(summary_text(result, out))
        if after is not None:
            after(ctx, result)
    except BaseException:
        ctx.close("errored")
        raise
    finally:
        bar.close()
    ctx.close("success")
    return 0


def summary_text(result: dict, out: Path) -> str:
    from tuneforge.quantization import served_name

    base = served_name(result["base_model"], result.get("quantization"))
    lines = [f"\n{result['type']} job {result.get('name')} on {base}: "
             f"{result.get('wall_seconds')} s", f"  {'folder':16s} {out}"]
    for key in ("steps", "epochs_trained", "early_stopped", "best_epoch", "learning_rate",
                "first_train_loss", "last_train_loss", "first_reward", "last_reward", "tasks",
                "completed", "failed", "adapter", "sampler_path"):
        if result.get(key) is not None:
            value = result[key]
            lines.append(f"  {key:16s} {value:.4g}" if isinstance(value, float)
                         else f"  {key:16s} {value}")
    report = result.get("eval") or {}
    scores = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    if scores:
        lines.append(f"  evaluation ({report.get('split', '')}): " + ", ".join(
            f"{k} {v:.4g}" for k, v in scores.items()))
    return "\n".join(lines)


def jobs(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("TINKER_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = args.api_key or os.environ.get("TINKER_API_KEY")
    if not key:
        raise UserError("an API key is needed: --api-key or TINKER_API_KEY")
    http = httpx.Client(base_url=f"{url}/api/jobs", headers={"X-API-Key": key}, timeout=600)

    def call(method: str, path: str = "", **kw):
        answer = http.request(method, path, **kw)
        if answer.status_code >= 400:
            try:
                detail = answer.json().get("detail", answer.text)
            except ValueError:
                detail = answer.text
            raise UserError(f"{answer.status_code}: {detail}")
        return answer.json()

    if args.action == "submit":
        from tuneforge.jobs.data import inline_files
        from tuneforge.jobs.spec import load_spec, spec_to_dict

        spec = load_spec(args.config)
        job = call("POST", json=spec_to_dict(inline_files(spec) if args.inline else spec))
        print(f"{job['id']}  {job['status']}")
    elif args.action == "list":
        for j in call("GET")["jobs"]:
            print(f"{j['id']}  {j['type']:7s} {j['status']:10s} {100 * j['progress']:5.1f}%  "
                  f"{j['name']}")
    elif args.action == "status":
        print(json.dumps(call("GET", f"/{args.job_id}"), indent=2))
    elif args.action == "metrics":
        print(json.dumps(call("GET", f"/{args.job_id}/metrics"), indent=2))
    elif args.action == "cancel":
        print(f"{args.job_id}  {call('POST', f'/{args.job_id}/cancel')['status']}")
    elif args.action == "logs":
        with http.stream("GET", f"/{args.job_id}/logs",
                         params={"follow": str(args.follow).lower()}) as answer:
            if answer.status_code >= 400:
                answer.read()
                raise UserError(f"{answer.status_code}: {answer.text}")
            for chunk in answer.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
    elif args.action == "evaluate":
        from tuneforge.jobs.evaluate import format_table

        body = {k: v for k, v in (("baseline", args.baseline), ("task", args.task),
                                  ("data", args.data)) if v is not None}
        report = call("POST", f"/{args.job_id}/evaluate", json=body)
        scores = {k: v for k, v in report["report"].items() if isinstance(v, (int, float))}
        print(json.dumps(scores, indent=2))
        if report.get("comparison"):
            print(format_table(report["comparison"]))
    return 0
