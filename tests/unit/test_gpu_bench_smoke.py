"""bench/gpu.py, the prepared one-GPU check, in its CPU smoke configuration: every part runs
(tiny models, fp32, a few steps), the correctness rows pass on CPU, and the table and the JSON
come out, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

CORRECTNESS = ("LoRA vs PEFT, bf16", "CE + LoRA grads fp32 vs f64", "CE + LoRA grads bf16 vs f64",
               "sampler vs trainer, fp32", "sampler vs trainer, bf16")
MEASURED = ("matmul rate", "LoRA step 2x64", "LoRA step 4x64", "offload r16 CPU>CPU>CPU",
            "8 tenants x 64 together", "decode batch 1 vs generate",
            "decode batch 8 vs generate")


def test_gpu_bench_smoke_run_prints_the_table(tmp_path, models_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path),
         "--models-dir", str(models_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    log = (tmp_path / "gpu.log").read_text() if (tmp_path / "gpu.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    lines = proc.stdout.splitlines()

    def row(label):
        found = [line for line in lines if line.startswith(label + " ")]
        assert found, f"no table row {label!r} in:\n{proc.stdout}"
        return found[0]

    for label in CORRECTNESS:
        assert row(label).rstrip().endswith("pass"), row(label)
    for label in MEASURED:
        verdict = row(label).rstrip()
        assert verdict.endswith(("measured", "met (smoke)", "missed (smoke)")), verdict
    assert "exact True" in row("offload r16 CPU>CPU>CPU")
    assert "greedy agree 100%" in row("decode batch 1 vs generate")

    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["smoke"] and set(results["parts"]) == {"correctness", "throughput"}
    assert all(p["status"] == "ok" for p in results["parts"].values())
    table = {r["check"]: r for r in results["table"]}
    assert set(CORRECTNESS) | set(MEASURED) <= set(table)
    assert all(table[label]["verdict"] == "pass" for label in CORRECTNESS)
    train = results["parts"]["throughput"]["train"]
    assert all(0 < e["mfu"] and e["tokens_per_s"] > 0 for e in train.values())
