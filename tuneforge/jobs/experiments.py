"""Results in the math-tutoring package's experiment layout (`tuneforge train --experiments
DIR`):

    DIR/baseline/<model>/benchmark_results.json   the base model, evaluated once
    DIR/baseline/<model>/training_config.yaml     the config it was first evaluated for
    DIR/sft/sft_NNN_<description>/                an SFT job (distillation/dist_NNN_…,
                                                  rlvr/rlvr_NNN_…)
        training_config.yaml    the config as given
        benchmark_results.json  the trained adapter on the evaluation data
        comparison.json         against the baseline's benchmark_results.json
        math_results.json       each evaluation row: expected, answer, the three matches
        (and tuneforge's own experiment folder files: config.yaml, log.txt, adapter/, ...)

NNN is the next free number in that folder (claimed by creating it, so two runs never share
one). <model> is the base model as served (`qwen3:8b`, `Qwen--Qwen3-8B` with the slash
replaced, `NAME@nf4` for a quantized base).

benchmark_results.json is the package's benchmark.py file: {model_name, endpoint, timestamp,
evaluations: {GROUP: {METRIC: value}}}. Its groups: `math_accuracy` with the package's own
metrics (exact_match_accuracy, numeric_match_accuracy, partial_match_accuracy: the greedy answer
to each evaluation row against its reference), and tuneforge's report of the job type,
`text_quality` (sft, distillation: loss, perplexity, exact_match, bleu, rouge1, rougeL) or
`reward` (rlvr: reward, accuracy). The evaluation data is the job's held-out data (eval_file),
else its training rows; a distillation job is evaluated on its teacher's held-out answers.

The baseline is made when it is missing: the base model is evaluated in the same run, on the
same rows, with the same evaluator as the adapter, and written to DIR/baseline/<model>/. Each
group records its `dataset`; a baseline group made on the same data is reused as it is, one
that is missing or was made on other data is evaluated in this run and replaced (a group
without a dataset, e.g. written by the package's own benchmark.py, is the user's and is used as
it is). A distillation job's data are its own teacher's answers, so its baseline groups are
always evaluated again. comparison.json is the package's compare_results: {baseline, current,
improvements: {GROUP.METRIC: {baseline, current, improvement}}, regressions: {...,
regression}} with a change of more than 0.01 counted (loss and perplexity improve downwards),
plus `metrics`, every metric side by side with its delta.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.jobs.model import served_base
from tuneforge.jobs.rundir import write_json

FOLDERS = {"sft": ("sft", "sft"), "distillation": ("distillation", "dist"),
           "rlvr": ("rlvr", "rlvr")}
THRESHOLD = 0.01  # the package's: smaller changes are neither improvements nor regressions
LOWER_IS_BETTER = ("loss", "perplexity")
TEXT_METRICS = ("loss", "perplexity", "exact_match", "bleu", "rouge1", "rougeL")
REWARD_METRICS = ("reward", "accuracy")
ALL_SAMPLES = 1_000_000  # the evaluator's sample list holds every row

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")
_UNIT = re.compile(r"\s*(units?|cm|m|kg|g|%)\s*$")


def description_of(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def claim_folder(root: Path, method: str, description: str) -> Path:
    """DIR/<kind>/<prefix>_NNN_<description>, NNN the next free number, created here."""
    kind, prefix = FOLDERS[method]
    parent = Path(root) / kind
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir()
             if (m := re.match(rf"{prefix}_(\d+)(?:_|$)", p.name))]
    number = max(taken, default=0) + 1
    while True:
        folder = parent / f"{prefix}_{number:03d}_{description_of(description)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def baseline_folder(root: Path, spec) -> Path:
    return Path(root) / "baseline" / served_base(spec).replace("/", "--")


# ---- the package's math metrics ------------------------------------------------------------


def _normalize(text: str) -> str:
    return _UNIT.sub("", str(text).strip().lower()).replace("$", "").replace(",", "")


def numbers(text: str) -> list[float]:
    out = []
    for token in _NUMBER.findall(str(text).replace(",", "")):
        num, _, den = token.partition("/")
        try:
            out.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            continue
    return out


def matches(expected: str, actual: str) -> dict[str, bool]:
    """The package's three checks of an answer: the normalized texts equal, a number of the
    expected answer among the answer's numbers (within 0.001), the expected text inside."""
    want = numbers(expected)
    got = numbers(actual)
    return {"exact_match": _normalize(expected) == _normalize(actual),
            "numeric_match": any(abs(w - g) < 1e-3 for w in want for g in got),
            "partial_match": _normalize(expected) in _normalize(actual)}


def math_accuracy(rows: list[dict]) -> tuple[dict, list[dict]]:
    """(the group's metrics, per-row results) for [{prompt, expected, actual}]."""
    results = [{**row, **matches(row["expected"], row["actual"])} for row in rows]
    n = max(len(results), 1)
    metrics = {f"{name}_accuracy": round(sum(r[name] for r in results) / n, 4)
               for name in ("exact_match", "numeric_match", "partial_match")}
    return {**metrics, "total_problems": len(results)}, results


# ---- benchmark files -----------------------------------------------------------------------


def evaluations(method: str, report: dict, dataset: str) -> tuple[dict, list[dict]]:
    """The benchmark groups of one evaluator report (its samples hold every row)."""
    rows = [{"prompt": s.get("prompt", ""),
             "expected": str(s.get("reference", s.get("answer", ""))),
             "actual": s.get("output", "")} for s in report.get("samples", [])]
    math, results = math_accuracy(rows)
    names = REWARD_METRICS if method == "rlvr" else TEXT_METRICS
    group = "reward" if method == "rlvr" else "text_quality"
    own = {k: report[k] for k in names if isinstance(report.get(k), (int, float))}
    return ({"math_accuracy": {**math, "dataset": dataset},
             group: {**own, "examples": report.get("examples"), "dataset": dataset}}, results)


def benchmark_file(model_name: str, endpoint: str, model_path: str | None,
                   groups: dict) -> dict:
    return {"model_name": model_name, "endpoint": endpoint, "model_path": model_path,
            "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
            "evaluations": groups}


def compare(baseline: dict, current: dict) -> dict:
    """The package's comparison.json (see the module docstring)."""
    out = {"baseline": baseline.get("model_name"), "current": current.get("model_name"),
           "improvements": {}, "regressions": {}, "metrics": {}}
    for group, values in current["evaluations"].items():
        before = baseline.get("evaluations", {}).get(group)
        if not isinstance(before, dict) or not isinstance(values, dict):
            continue
        for metric, value in values.items():
            old = before.get(metric)
            if (metric in ("examples", "total_problems") or isinstance(value, bool)
                    or not isinstance(value, (int, float)) or not isinstance(old, (int, float))):
                continue
            key = f"{group}.{metric}"
            delta = value - old
            out["metrics"][key] = {"baseline": old, "current": value, "delta": delta}
            gain = -delta if metric in LOWER_IS_BETTER else delta
            if gain > THRESHOLD:
                out["improvements"][key] = {"baseline": old, "current": value,
                                            "improvement": abs(delta)}
            elif gain < -THRESHOLD:
                out["regressions"][key] = {"baseline": old, "current": value,
                                           "regression": abs(delta)}
    return out


def write_experiment(service, root: Path, folder: Path, method: str, spec, config: Path,
                     result: dict, endpoint: str, echo=print) -> dict:
    """Benchmark the finished job in `folder` (and the base model when the baseline lacks it)
    and write the package's files; returns comparison.json."""
    import json

    from tuneforge.jobs.report import evaluate_run

    shutil.copyfile(config, folder / "training_config.yaml")
    base_dir = baseline_folder(root, spec)
    base_file = base_dir / "benchmark_results.json"
    baseline = json.loads(base_file.read_text()) if base_file.exists() else None
    data = spec.eval_data if method != "distillation" else None
    if method == "distillation":  # a teacher's answers are this run's own
        dataset = f"{folder.name}/teacher_data.jsonl (held out)"
    else:
        dataset = (str(data) if isinstance(data, str) else
                   "eval_data rows" if data is not None else
                   "the held-out split" if spec.eval_split else "the training rows")
    have = (baseline or {}).get("evaluations", {})
    needed = ("math_accuracy", "reward" if method == "rlvr" else "text_quality")
    # a group is evaluated (again) when missing or made on other data; one without a dataset
    # (e.g. from the package's own benchmark.py) is the user's and is used as it is
    stale = [g for g in needed if not isinstance(have.get(g), dict)
             or have[g].get("dataset", dataset) != dataset]
    try:
        evaluated = evaluate_run(service, folder, data_source=data,
                                 baseline="base" if stale else None, samples=ALL_SAMPLES)
    except UserError as e:
        raise UserError(f"--experiments: the benchmark failed: {e.message}") from None
    groups, results = evaluations(method, evaluated["report"], dataset)
    current = benchmark_file(folder.name, endpoint, result.get("sampler_path"), groups)
    write_json(folder / "benchmark_results.json", current)
    write_json(folder / "math_results.json", {"dataset": dataset, "results": results})
    if stale:
        base_groups, _ = evaluations(method, evaluated["baseline"]["report"], dataset)
        if baseline is None:
            baseline = benchmark_file(served_base(spec), endpoint, None, {})
            base_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, base_dir / "training_config.yaml")
        baseline["evaluations"] = {**have, **{g: base_groups[g] for g in stale}}
        write_json(base_file, baseline)
        echo(f"baseline {served_base(spec)} evaluated on {dataset}: {base_file}")
    comparison = {**compare(baseline, current), "baseline_file": str(base_file)}
    write_json(folder / "comparison.json", comparison)
    return comparison


def comparison_text(comparison: dict) -> str:
    lines = [f"  compared with the baseline {comparison['baseline']}:"]
    for key, row in comparison["metrics"].items():
        mark = ("better" if key in comparison["improvements"] else
                "worse" if key in comparison["regressions"] else "same")
        lines.append(f"    {key:40s} {row['baseline']:.4g} -> {row['current']:.4g} ({mark})")
    return "\n".join(lines)
