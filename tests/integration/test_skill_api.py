"""The agent-skill adapter's REST API on a real server, driven with plain HTTP as its guide shows
(start -> status -> logs -> evaluate): exact fields and types, the SKILL_ADAPTER_* settings as
defaults, errors naming the field, isolation between keys, and its checkpoint folders loaded
with PEFT giving the server's own logprobs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.server import ServerProcess

SKILL = """---
name: describing-animals
description: Describe an animal in one short sentence.
---
# Skill: describing animals

When asked about an animal, answer with one sentence naming its colour and where it lives.
"""
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
STATUS_FIELDS = {"job_id": str, "status": str, "progress": float, "current_epoch": int,
                 "total_epochs": int, "loss": (float, type(None)),
                 "started_at": (str, type(None))}
SETTINGS = {"SKILL_ADAPTER_MODEL": "tuneforge/tiny-qwen3", "SKILL_ADAPTER_NUM_EPOCHS": "1",
            "SKILL_ADAPTER_BATCH_SIZE": "2", "SKILL_ADAPTER_GRADIENT_ACCUMULATION_STEPS": "1",
            "SKILL_ADAPTER_LORA_R": "4", "SKILL_ADAPTER_LORA_ALPHA": "16",
            "SKILL_ADAPTER_MAX_SEQ_LENGTH": "256",
            "SKILL_ADAPTER_LEARNING_RATE": "5e-3", "SKILL_ADAPTER_NUM_PROMPTS": "6",
            "SKILL_ADAPTER_EVAL_SPLIT": "0.34", "SKILL_ADAPTER_TEACHER_MAX_TOKENS": "12"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skill-files")
    (root / "animals").mkdir()
    (root / "animals" / "SKILL.md").write_text(SKILL)
    (root.parent / "outside.md").write_text(SKILL)
    return root


@pytest.fixture(scope="module")
def skill_server(tmp_path_factory, models_dir, files):
    proc = ServerProcess(tmp_path_factory.mktemp("skill"), models_dir,
                         env={"TUNEFORGE_JOB_FILES_DIR": str(files), **SETTINGS}).start()
    yield proc
    proc.stop()


def client(server: ServerProcess, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"X-API-Key": key or server.api_key},
                        timeout=600)


def typed(answer: dict, fields: dict) -> None:
    assert set(answer) == set(fields), answer
    for name, kind in fields.items():
        assert isinstance(answer[name], kind) and not isinstance(answer[name], bool), (name,
                                                                                      answer)


def start(server: ServerProcess, body: dict) -> str:
    answer = client(server).post("/api/training/start", json=body)
    assert answer.status_code == 200, answer.text
    started = answer.json()
    typed(started, {"job_id": str, "status": str, "created_at": str})
    assert started["job_id"].startswith("train-") and started["status"] == "queued"
    assert TIME.match(started["created_at"])
    return started["job_id"]


def wait(server: ServerProcess, job_id: str, timeout: float = 600) -> list[dict]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client(server).get(f"/api/training/{job_id}/status").json()
        typed(status, STATUS_FIELDS)
        seen.append(status)
        if status["status"] not in ("queued", "running"):
            assert status["status"] == "completed", server.log()
            return seen
        time.sleep(0.3)
    raise TimeoutError(f"{job_id} did not finish: {seen[-1]}")


def logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def job(server: ServerProcess, job_id: str) -> dict:
    return client(server).get(f"/api/jobs/{job_id}").json()


def test_start_status_logs_evaluate_and_the_checkpoint_layout(skill_server, models_dir):
    import peft
    import tinker
    import torch
    from tinker import types
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = start(skill_server, {"skill_path": "animals/SKILL.md", "adapter_type": "lora",
                                  "num_epochs": 2, "learning_rate": 1e-2, "batch_size": 2})
    seen = wait(skill_server, job_id)
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress)
    final = seen[-1]
    assert final["progress"] == 1.0 and final["current_epoch"] == final["total_epochs"] == 2
    assert isinstance(final["loss"], float) and TIME.match(final["started_at"])

    # one job, two doors: the job API shows the same job, trained as the body and settings say
    same = job(skill_server, job_id)
    assert same["status"] == "completed" and same["type"] == "distill"
    folder = Path(same["folder"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["teacher"]["model"] == config["base_model"] == "tuneforge/tiny-qwen3"
    assert Path(config["teacher"]["skill_file"]).read_text() == SKILL
    assert "data" not in config and config["generate_prompts"] == 6
    assert (config["epochs"], config["learning_rate"], config["batch_size"]) == (2, 1e-2, 2)
    assert (config["lora_rank"], config["max_length"], config["lora_alpha"],
            config["lora_dropout"], config["quantization"]) == (4, 256, 16.0, 0.05, "none")

    bearer = {"Authorization": f"Bearer {skill_server.api_key}"}  # (the other spelling)
    logs = httpx.get(f"{skill_server.base_url}/api/training/{job_id}/logs", headers=bearer,
                     timeout=60).json()
    assert set(logs) == {"job_id", "logs"} and logs["job_id"] == job_id
    assert all(isinstance(line, str) for line in logs["logs"])
    assert any("distinct requests" in line for line in logs["logs"])

    evaluated = client(skill_server).post(f"/api/training/{job_id}/evaluate")
    assert evaluated.status_code == 200, evaluated.text
    ev = evaluated.json()
    typed(ev, {"job_id": str, "status": str, "split": str, "num_examples": int,
               "accuracy": float, "bleu": float, "perplexity": float, "loss": float,
               "report": dict, "evaluated_at": str})
    assert ev["split"] == "held-out" and ev["num_examples"] >= 1
    assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["bleu"] <= 100.0
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"])) and ev["perplexity"] > 1.0
    assert ev["report"]["samples"] and TIME.match(ev["evaluated_at"])

    # checkpoints/train-…/checkpoint-STEP/ for each saved step, and final/
    root = folder / "checkpoints" / job_id
    steps = [json.loads(line)["step"] for line in
             (folder / "checkpoints.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["final", *(f"checkpoint-{s}" for s in steps)])
    for s in steps:
        names = {p.name for p in (root / f"checkpoint-{s}").iterdir()}
        assert names == {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"}
        state = torch.load(root / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)
        assert state  # AdamW moments of the step
        lora = json.loads((root / f"checkpoint-{s}" / "adapter_config.json").read_text())
        # the run trained with the settings' rank, alpha and (the documented default) dropout
        assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (4, 16.0, 0.05)
    tiny = models_dir / "tuneforge--tiny-qwen3"
    ids = AutoTokenizer.from_pretrained(str(tiny)).encode("A fox is red and lives in woods.")
    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    untrained = logprobs(base, ids)
    model = peft.PeftModel.from_pretrained(base, str(root / "final")).eval()
    service = tinker.ServiceClient(base_url=skill_server.base_url, api_key=skill_server.api_key)
    sampler = service.create_sampling_client(model_path=same["result"]["sampler_path"]).result()
    served = np.array(sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()[1:])
    print(f"\nPEFT final/ vs server logprobs: max |diff| "
          f"{np.abs(logprobs(model, ids) - served).max():.2e}; vs the base "
          f"{np.abs(untrained - served).max():.2e}")
    np.testing.assert_allclose(logprobs(model, ids), served, rtol=0, atol=1e-4)
    assert np.abs(untrained - served).max() > 1e-3  # (the adapter is not a no-op)


def test_an_uploaded_skill_takes_the_settings_as_defaults(skill_server):
    job_id = start(skill_server, {"skill_content": SKILL, "adapter_type": "qlora"})
    early = client(skill_server).post(f"/api/training/{job_id}/evaluate")
    if early.status_code != 200:  # (it may even have finished already on a fast machine)
        assert early.status_code == 400 and early.json()["errors"][0]["field"] == "job_id"
    wait(skill_server, job_id)
    folder = Path(job(skill_server, job_id)["folder"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["teacher"]["system_prompt"] == SKILL and "skill_file" not in config["teacher"]
    assert (config["epochs"], config["batch_size"], config["learning_rate"],
            config["gradient_accumulation_steps"], config["lora_rank"],
            config["quantization"]) == (1, 2, 5e-3, 1, 4, "nf4")
    assert (folder / "checkpoints" / job_id / "final" / "adapter_model.safetensors").exists()


def test_bad_requests_name_the_field_and_other_keys_see_nothing(skill_server, files):
    http = client(skill_server)
    ok = {"skill_path": "animals/SKILL.md"}
    bad = [({**ok, "epochs": 2}, "epochs", "unknown field"),
           ({**ok, "adapter_type": "foo"}, "adapter_type", "'lora' or 'qlora'"),
           ({**ok, "num_epochs": "2"}, "num_epochs", "integer"),
           ({**ok, "learning_rate": 0}, "learning_rate", "greater than 0"),
           ({"skill_path": "../outside.md"}, "skill_path", "outside the job files folder"),
           ({"skill_path": "/etc/hosts"}, "skill_path", "outside the job files folder"),
           ({"skill_path": "animals/NONE.md"}, "skill_path", "no such file"),
           ({"num_epochs": 1}, "skill_path", "give skill_path"),
           ({**ok, "skill_content": SKILL}, "skill_path", "give skill_path")]
    for body, field, words in bad:
        answer = http.post("/api/training/start", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert field in {e["field"] for e in answer.json()["errors"]}, (body, answer.text)
        assert words in answer.json()["detail"], (body, answer.text)
    assert http.get("/api/training/train-000000000000/status").status_code == 404
    assert http.post("/api/training/train-000000000000/evaluate").status_code == 404
    assert http.get("/api/training/x/status", headers={"X-API-Key": "nope"}).status_code == 401
    job_id = start(skill_server, {"skill_content": SKILL, "num_epochs": 1})
    answer = http.post(f"/api/training/{job_id}/evaluate", json={"baseline": "base"})
    assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == "baseline"
    out = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--data-dir",
                          str(skill_server.data_dir)], capture_output=True, text=True,
                         check=True)
    other = client(skill_server, out.stdout.split()[1])
    for method, path in (("GET", "status"), ("GET", "logs"), ("POST", "evaluate")):
        assert other.request(method, f"/api/training/{job_id}/{path}").status_code == 404
    assert other.get(f"/api/jobs/{job_id}").status_code == 404
    client(skill_server).post(f"/api/jobs/{job_id}/cancel")


def test_settings_are_checked_at_start_and_the_model_and_files_must_be_there(tmp_path, models_dir):
    broken = ServerProcess(tmp_path / "broken", models_dir, preload=(),
                           env={"SKILL_ADAPTER_LORA_DROPOUT": "1.5"})
    with pytest.raises(RuntimeError, match="SKILL_ADAPTER_LORA_DROPOUT='1.5'"):
        broken.start()
    misspelt = ServerProcess(tmp_path / "misspelt", models_dir, preload=(),
                             env={"SKILL_ADAPTER_LORA_DROPUT": "0.1"})
    with pytest.raises(RuntimeError, match="SKILL_ADAPTER_LORA_DROPUT: unknown setting"):
        misspelt.start()
    plain = ServerProcess(tmp_path / "plain", models_dir, preload=()).start()
    try:
        answer = client(plain).post("/api/training/start", json={"skill_content": SKILL})
        assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == "model"
        assert "'Qwen/Qwen3-30B-A3B' (SKILL_ADAPTER_MODEL) is not served here" in \
            answer.json()["detail"]
        # (this one has no TUNEFORGE_JOB_FILES_DIR)
        answer = client(plain).post("/api/training/start", json={"skill_path": "SKILL.md"})
        assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == "skill_path"
        assert "send the skill's text as skill_content" in answer.json()["detail"]
    finally:
        plain.stop()
