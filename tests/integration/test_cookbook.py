"""tinker-cookbook's own recipes, unmodified, against tuneforge, offline.

The recipes name models the cookbook knows; tuneforge serves its models under those names
(TUNEFORGE_MODEL_ALIASES) and `tuneforge cache-tokenizer` puts their tokenizers in the local
Hugging Face cache, where the cookbook's `get_tokenizer` finds them offline. The datasets the
recipes load (no_robots, gsm8k) get small stand-ins in the `datasets` cache. Everything else is
the recipes' own command-line configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker_cookbook

from tests.integration import cookbook_offline as offline
from tests.integration.server import ServerProcess

TINY_AS = "Qwen/Qwen3-4B-Instruct-2507"  # served as tuneforge/tiny-qwen3
SMOL_AS = "Qwen/Qwen3-30B-A3B-Instruct-2507"  # served as SmolLM2-135M-Instruct
WARM_AS = "Qwen/Qwen3-235B-A22B-Instruct-2507"  # served as the tiny model after SFT, merged
ALIASES = {TINY_AS: "tuneforge/tiny-qwen3", SMOL_AS: "HuggingFaceTB/SmolLM2-135M-Instruct"}

pytestmark = pytest.mark.slow


def env_for(hf_home: Path, aliases: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TUNEFORGE_MODEL_ALIASES": json.dumps(aliases)}


def tuneforge(env: dict, server: ServerProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge", *args, "--data-dir",
                          str(server.data_dir), "--models-dir", str(server.models_dir)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def recipe(name: str, server: ServerProcess, env: dict, log_path: Path, **config) -> list[dict]:
    """Run `python -m tinker_cookbook.recipes.NAME key=value ...`; return its metrics.jsonl."""
    args = [f"base_url={server.base_url}", f"log_path={log_path}", "save_every=0",
            *(f"{k}={v}" for k, v in config.items())]
    out = subprocess.run([sys.executable, "-m", f"tinker_cookbook.recipes.{name}", *args],
                         capture_output=True, text=True, timeout=900,
                         env={**env, "TINKER_API_KEY": server.api_key})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def checkpoint(log_path: Path, kind: str = "state_path") -> str:
    rows = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    return next(r[kind] for r in rows if r["name"] == "final")


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory, models_dir) -> Iterator[tuple[ServerProcess, dict]]:
    """A server with the tiny model and SmolLM2 under cookbook names; no_robots = the cookbook's
    example_data/conversations.jsonl; gsm8k = the toy question."""
    hf_home = tmp_path_factory.mktemp("hf-chat")
    env = env_for(hf_home, ALIASES)
    example = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    offline.install_dataset(hf_home, "HuggingFaceH4/no_robots", "default",
                            offline.conversations(example))
    offline.install_dataset(hf_home, "openai/gsm8k", "main", offline.toy_gsm8k_rows(64))
    server = ServerProcess(tmp_path_factory.mktemp("cookbook-server"), models_dir,
                           env={k: env[k] for k in ("HF_HOME", "TUNEFORGE_MODEL_ALIASES")},
                           preload=(TINY_AS, SMOL_AS)).start()
    for name in ALIASES:
        tuneforge(env, server, "cache-tokenizer", name)
    yield server, env
    server.stop()


def falls(values: list[float]) -> bool:
    """The mean of the second half is clearly below the first value."""
    late = values[len(values) // 2:]
    return sum(late) / len(late) < 0.85 * values[0]


@pytest.mark.parametrize("model, config", [
    (TINY_AS, {"batch_size": 8, "max_steps": 16, "learning_rate": 1e-2, "lora_rank": 16}),
    (SMOL_AS, {"batch_size": 8, "max_steps": 6, "learning_rate": 5e-4, "lora_rank": 16}),
], ids=["tiny-qwen3", "smollm2"])
def test_sl_loop_lowers_the_loss(chat_setup, tmp_path, capsys, model, config):
    server, env = chat_setup
    metrics = recipe("sl_loop", server, env, tmp_path / "sl", model_name=model, **config)
    nll = [m["train_mean_nll"] for m in metrics]
    with capsys.disabled():
        print(f"\nsl_loop on {model}: train_mean_nll {[round(x, 3) for x in nll]}")
    assert len(nll) == config["max_steps"]
    assert falls(nll)
    assert checkpoint(tmp_path / "sl").endswith("/weights/final")


def test_rl_loop_runs_on_smollm2(chat_setup, tmp_path):
    server, env = chat_setup
    metrics = recipe("rl_loop", server, env, tmp_path / "rl", model_name=SMOL_AS, batch_size=2,
                     group_size=2, max_tokens=16, max_steps=2)
    assert [m["progress/batch"] for m in metrics] == [0, 1]
    assert all(0.0 <= m["reward/total"] <= 1.0 for m in metrics)


def test_sft_then_rl_raises_the_reward(tmp_path_factory, models_dir, capsys):
    """sl_loop teaches the tiny model the answer format with noisy labels; the result, merged
    with `tuneforge export --merged`, is served under a new name and rl_loop, rewarded for the
    true answer, raises the mean reward. The recipes seed neither their LoRA initialisation nor
    their sampling, and with fresh randomness a poor warm-up (one in a few) leaves every RL
    group at reward 0 and nothing to learn from; TUNEFORGE_SEED makes the run the same each
    time."""
    hf_home = tmp_path_factory.mktemp("hf-toy")
    root = tmp_path_factory.mktemp("toy")
    offline.install_dataset(hf_home, "HuggingFaceH4/no_robots", "default",
                            offline.toy_sft_rows(160))
    offline.install_dataset(hf_home, "openai/gsm8k", "main", offline.toy_gsm8k_rows(400))
    aliases = {TINY_AS: "tuneforge/tiny-qwen3", WARM_AS: str(root / "merged")}
    env = {**env_for(hf_home, aliases), "TUNEFORGE_SEED": "0"}
    sft_server = ServerProcess(root / "sft-server", models_dir, preload=(TINY_AS,),
                               env={k: env[k] for k in ("HF_HOME", "TUNEFORGE_MODEL_ALIASES",
                                                       "TUNEFORGE_SEED")})
    sft_server.start()
    try:
        tuneforge(env, sft_server, "cache-tokenizer", TINY_AS)
        sft = recipe("sl_loop", sft_server, env, root / "sft", model_name=TINY_AS,
                     batch_size=16, max_steps=50, learning_rate=5e-3, lora_rank=32,
                     train_on_what="last_assistant_message")
        tuneforge(env, sft_server, "export", checkpoint(root / "sft"), "--to",
                  str(root / "merged"), "--merged")
        tuneforge(env, sft_server, "cache-tokenizer", WARM_AS)
    finally:
        sft_server.stop()

    rl_server = ServerProcess(root / "rl-server", models_dir, preload=(WARM_AS,),
                              env={k: env[k] for k in ("HF_HOME", "TUNEFORGE_MODEL_ALIASES",
                                                       "TUNEFORGE_SEED")})
    rl_server.start()
    try:
        metrics = recipe("rl_loop", rl_server, env, root / "rl", model_name=WARM_AS,
                         batch_size=8, group_size=8, max_tokens=12, learning_rate=3e-3,
                         lora_rank=32, max_steps=14)
    finally:
        rl_server.stop()
    nll = [m["train_mean_nll"] for m in sft]
    rewards = [m["reward/total"] for m in metrics]
    with capsys.disabled():
        print(f"\nSFT train_mean_nll {[round(x, 2) for x in nll[::5]]} (every 5th step)")
        print(f"rl_loop reward/total by batch {[round(r, 3) for r in rewards]}")
    assert nll[-1] < 0.2 * nll[0]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, (first, last)
