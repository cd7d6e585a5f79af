"""The math-tutoring package's configs run unchanged through `tuneforge train` (a subprocess, as
a user runs it): `backend: local` on the embedded server and `backend: tinker` on the server at
TINKER_BASE_URL, with `qwen3:8b` aliased to the tiny model; the results land in the package's
experiment layout (a baseline made once, numbered SFT folders, comparison.json); bad keys and
an unaliased Ollama name are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
import yaml

from tests.integration.server import ServerProcess

ALIASES = json.dumps({"qwen3:8b": "tuneforge/tiny-qwen3"})
# the config of the package's README, as written there
PACKAGE_CONFIG = """backend: local
model:
  base_model: "qwen3:8b"
data:
  train_file: "data/train.jsonl"
  eval_file: "data/eval.jsonl"
training:
  num_epochs: 3
  batch_size: 8
  learning_rate: 2e-5
"""
PROBLEMS = [("2 + 3", 5), ("4 + 4", 8), ("6 - 2", 4), ("3 x 3", 9), ("10 / 2", 5), ("7 + 1", 8),
            ("9 - 6", 3), ("2 x 6", 12)]


@pytest.fixture(scope="module")
def tutoring_server(tmp_path_factory, models_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("tutoring"), models_dir,
                         env={"TUNEFORGE_MODEL_ALIASES": ALIASES}).start()
    yield proc
    proc.stop()


@pytest.fixture
def package(tmp_path) -> Path:
    """A folder as the package has it: configs beside data/train.jsonl and data/eval.jsonl."""
    (tmp_path / "data").mkdir()
    rows = [{"prompt": f"Student: What is {q}?\nMode: explain",
             "response": f"{q} = {a}. The answer is {a}.", "grade": "2",
             "topic_tags": ["arithmetic"]} for q, a in PROBLEMS]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                          for r in rows[:4]))
    (tmp_path / "sft.yaml").write_text(PACKAGE_CONFIG)
    return tmp_path


def env_for(models_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TUNEFORGE_DTYPE": "fp32",
           "TUNEFORGE_MODELS_DIR": str(models_dir), **extra}
    for name in ("TINKER_BASE_URL", "TINKER_API_KEY", "TUNEFORGE_MODEL_ALIASES"):
        if name not in extra:
            env.pop(name, None)
    return env


def train(folder: Path, config: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", "train", config, "--data-dir",
                           str(folder / "server-data"), "--threads", "1", *args],
                          cwd=folder, capture_output=True, text=True, env=env, timeout=600)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def check_comparison(comparison: dict, baseline: dict, current: dict) -> None:
    """comparison.json holds each metric of both files, its delta and the package's verdict."""
    assert comparison["baseline"] == baseline["model_name"]
    assert comparison["current"] == current["model_name"]
    own = (("reward.reward", "reward.accuracy") if "reward" in current["evaluations"]
           else ("text_quality.loss", "text_quality.perplexity"))
    assert {"math_accuracy.numeric_match_accuracy", *own} <= set(comparison["metrics"])
    for key, row in comparison["metrics"].items():
        group, metric = key.split(".")
        assert row["baseline"] == baseline["evaluations"][group][metric]
        assert row["current"] == current["evaluations"][group][metric]
        assert row["delta"] == pytest.approx(row["current"] - row["baseline"])
        gain = -row["delta"] if metric in ("loss", "perplexity") else row["delta"]
        assert (key in comparison["improvements"]) == (gain > 0.01)
        assert (key in comparison["regressions"]) == (gain < -0.01)


def test_the_package_config_trains_on_both_backends_into_its_experiment_layout(
        package, tutoring_server, models_dir):
    exp = package / "experiments"
    # backend: local, the config exactly as the package's README writes it (a TINKER_BASE_URL
    # in the environment is not used: the config says local)
    local = train(package, "sft.yaml", env_for(models_dir, TUNEFORGE_MODEL_ALIASES=ALIASES,
                                               TINKER_BASE_URL="http://127.0.0.1:9"),
                  "--experiments", str(exp), "--description", "package config")
    assert local.returncode == 0, local.stderr[-3000:]
    first = exp / "sft" / "sft_001_package-config"
    assert (first / "training_config.yaml").read_text() == PACKAGE_CONFIG
    config = yaml.safe_load((first / "config.yaml").read_text())  # tuneforge's own files too
    assert (config["type"], config["base_model"], config["epochs"], config["batch_size"],
            config["learning_rate"]) == ("sft", "qwen3:8b", 3, 8, 2e-5)
    assert config["eval_data"] == str(package / "data" / "eval.jsonl")
    assert read(first / "result.json")["steps"] == 3  # 8 rows in one batch, 3 epochs
    assert (first / "adapter" / "adapter_model.safetensors").exists()
    baseline_file = exp / "baseline" / "qwen3:8b" / "benchmark_results.json"
    baseline = read(baseline_file)
    assert baseline["model_name"] == "qwen3:8b" and baseline["model_path"] is None
    current = read(first / "benchmark_results.json")
    assert current["model_name"] == "sft_001_package-config"
    assert current["model_path"].startswith("tinker://")
    for report in (baseline, current):
        math = report["evaluations"]["math_accuracy"]
        assert math["total_problems"] == 4 and math["dataset"].endswith("eval.jsonl")
        assert 0 <= math["numeric_match_accuracy"] <= 1
    # the benchmark's loss is the held-out loss the job itself reported
    assert current["evaluations"]["text_quality"]["loss"] == pytest.approx(
        read(first / "eval_report.json")["loss"], rel=1e-4)
    check_comparison(read(first / "comparison.json"), baseline, current)
    assert "compared with the baseline qwen3:8b" in local.stdout
    baseline_bytes = baseline_file.read_bytes()

    # backend: tinker against the running server (its alias table serves qwen3:8b), a learning
    # rate that learns the rows in a few steps; the baseline is reused, not made again
    fast = PACKAGE_CONFIG.replace("backend: local", "backend: tinker").replace(
        "learning_rate: 2e-5", "learning_rate: 3e-3").replace("batch_size: 8", "batch_size: 4")
    (package / "sft_fast.yaml").write_text(fast)
    remote = train(package, "sft_fast.yaml",
                   env_for(models_dir, TINKER_BASE_URL=tutoring_server.base_url,
                           TINKER_API_KEY=tutoring_server.api_key), "--experiments", str(exp))
    assert remote.returncode == 0, remote.stderr[-3000:]
    second = exp / "sft" / "sft_002_sft_fast"
    assert read(second / "result.json")["steps"] == 6
    assert baseline_file.read_bytes() == baseline_bytes
    current = read(second / "benchmark_results.json")
    assert current["endpoint"] == tutoring_server.base_url
    # the adapter's weights live on that server
    service = tinker.ServiceClient(base_url=tutoring_server.base_url,
                                   api_key=tutoring_server.api_key)
    service.create_sampling_client(model_path=current["model_path"])
    comparison = read(second / "comparison.json")
    check_comparison(comparison, baseline, current)
    loss = comparison["metrics"]["text_quality.loss"]
    print(f"\ntutoring sft (tinker backend): held-out loss {loss['baseline']:.3f} (base) -> "
          f"{loss['current']:.3f}")
    assert loss["current"] < loss["baseline"] - 0.5
    assert "text_quality.loss" in comparison["improvements"]


def test_distillation_and_rlvr_configs_land_in_their_folders(package, tutoring_server,
                                                             models_dir):
    (package / "data" / "questions.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {q}? Answer inside \\boxed{{}}.", "answer": a}) + "\n"
        for q, a in PROBLEMS[:4]))
    (package / "distill.yaml").write_text("""backend: tinker
model:
  base_model: "qwen3:8b"
teacher:
  model: "qwen3:8b"
  system_prompt: "Answer in one short sentence."
  max_tokens: 12
data:
  train_file: data/train.jsonl
  eval_split: 0.25
  eval_max_tokens: 12
training:
  num_epochs: 2
  batch_size: 3
  learning_rate: 3e-3
""")
    (package / "rlvr.yaml").write_text("""backend: tinker
method: rlvr
model:
  base_model: "qwen3:8b"
data:
  train_file: data/questions.jsonl
  eval_file: data/questions.jsonl
rlvr:
  grader: boxed_number
  group_size: 2
  max_tokens: 8
training:
  num_epochs: 1
  batch_size: 4
""")
    env = env_for(models_dir, TINKER_BASE_URL=tutoring_server.base_url,
                  TINKER_API_KEY=tutoring_server.api_key)
    exp = package / "experiments"
    for name in ("distill.yaml", "rlvr.yaml"):
        done = train(package, name, env, "--experiments", str(exp))
        assert done.returncode == 0, done.stderr[-3000:]
    dist = exp / "distillation" / "dist_001_distill"
    rlvr = exp / "rlvr" / "rlvr_001_rlvr"
    assert yaml.safe_load((dist / "config.yaml").read_text())["type"] == "distill"
    assert yaml.safe_load((rlvr / "config.yaml").read_text())["type"] == "rl"
    baseline = read(exp / "baseline" / "qwen3:8b" / "benchmark_results.json")
    # the base model on the teacher's held-out answers is the job's own base_model_loss
    comparison = read(dist / "comparison.json")
    assert comparison["metrics"]["text_quality.loss"]["baseline"] == pytest.approx(
        read(dist / "eval_report.json")["base_model_loss"], rel=1e-4)
    check_comparison(comparison, baseline, read(dist / "benchmark_results.json"))
    assert baseline["evaluations"]["text_quality"]["dataset"].startswith("dist_001_distill/")
    current = read(rlvr / "benchmark_results.json")
    assert set(current["evaluations"]) == {"math_accuracy", "reward"}
    assert current["evaluations"]["reward"]["dataset"].endswith("questions.jsonl")
    assert current["evaluations"]["reward"]["accuracy"] == read(rlvr / "eval_report.json")[
        "accuracy"]
    check_comparison(read(rlvr / "comparison.json"), baseline, current)


def test_bad_keys_and_a_missing_server_are_refused_in_the_package_terms(package, models_dir):
    env = env_for(models_dir)
    (package / "typo.yaml").write_text(PACKAGE_CONFIG.replace("num_epochs", "num_epoch"))
    typo = train(package, "typo.yaml", env, "--check")
    assert typo.returncode == 1
    assert ("training.num_epoch: unknown option (not implemented or misspelt; did you mean "
            "training.num_epochs?)") in typo.stderr
    (package / "bad_lr.yaml").write_text(PACKAGE_CONFIG.replace("2e-5", "7"))
    bad_lr = train(package, "bad_lr.yaml", env, "--check")
    assert bad_lr.returncode == 1 and "training.learning_rate: Input should be less" in \
        bad_lr.stderr
    (package / "no_file.yaml").write_text(PACKAGE_CONFIG.replace("eval.jsonl", "missing.jsonl"))
    no_file = train(package, "no_file.yaml", env, "--check")
    assert no_file.returncode == 1 and "data.eval_file: no such file" in no_file.stderr
    (package / "remote.yaml").write_text(PACKAGE_CONFIG.replace("backend: local",
                                                              "backend: tinker"))
    remote = train(package, "remote.yaml", env, "--check")
    assert remote.returncode == 1 and "backend: tinker" in remote.stderr
    assert "set TINKER_BASE_URL" in remote.stderr
    assert train(package, "sft.yaml", env, "--check").returncode == 0


def test_an_unaliased_ollama_name_is_refused_naming_it(package, tutoring_server, models_dir,
                                                       tmp_path_factory):
    # no alias and an empty Hugging Face cache: qwen3:8b is Ollama's name of Qwen/Qwen3-8B,
    # which is not here
    hf_home = tmp_path_factory.mktemp("empty-hf")
    local = train(package, "sft.yaml", env_for(models_dir, HF_HOME=str(hf_home)),
                  "--out", str(package / "out"))
    assert local.returncode == 1
    assert "base_model 'qwen3:8b' is Ollama's name of Qwen/Qwen3-8B" in local.stderr
    assert "--alias qwen3:8b=MODEL or TUNEFORGE_MODEL_ALIASES" in local.stderr
    assert "Traceback" not in local.stderr
    # a name in neither the server's alias table nor Ollama's well-known ones
    unknown = PACKAGE_CONFIG.replace("backend: local", "backend: tinker").replace(
        "qwen3:8b", "mistral:7b")
    (package / "unknown.yaml").write_text(unknown)
    remote = train(package, "unknown.yaml",
                   env_for(models_dir, TINKER_BASE_URL=tutoring_server.base_url,
                           TINKER_API_KEY=tutoring_server.api_key), "--out",
                   str(package / "out2"))
    assert remote.returncode == 1
    assert ("base_model 'mistral:7b': no alias or local model matches this Ollama-style name; "
            "add one with --alias mistral:7b=MODEL") in remote.stderr
