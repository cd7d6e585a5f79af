"""The job layer end to end: the shipped example configs run through the REST job API on a real
server (each job calls the server back through the `tinker` SDK) and must show learning; an
atomic batch with a broken and a plateauing task; cancel, errors, isolation; a restart mid-job
resumes from the last checkpoint; the `tuneforge train` / `tuneforge jobs` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server import ServerProcess
from tuneforge.jobs.data import inline_files
from tuneforge.jobs.spec import load_spec, spec_to_dict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory, models_dir):
    """Jobs may name files inside examples/ only (others send their rows inline)."""
    proc = ServerProcess(tmp_path_factory.mktemp("jobs"), models_dir,
                         env={"TUNEFORGE_JOB_FILES_DIR": str(EXAMPLES)}).start()
    yield proc
    proc.stop()


def api(server: ServerProcess, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"{server.base_url}/api/jobs",
                        headers={"X-API-Key": key or server.api_key}, timeout=600)


def example(name: str, **changes) -> dict:
    """An example config as `tuneforge jobs submit` sends it: files inlined."""
    return {**spec_to_dict(inline_files(load_spec(EXAMPLES / name))), **changes}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submit(server: ServerProcess, spec: dict) -> str:
    answer = api(server).post("", json=spec)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("queued", "running")
    return answer.json()["id"]


def wait(server: ServerProcess, job_id: str, timeout: float = 600, until=None,
         monotonic: bool = True) -> dict:
    deadline = time.monotonic() + timeout
    seen_progress = []
    while time.monotonic() < deadline:
        job = api(server).get(f"/{job_id}").json()
        seen_progress.append(job["progress"])
        if until is not None and until(job):
            return job
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "completed", (job["error"], server.log())
            if monotonic:  # (after a restart it restarts from the checkpoint's step)
                assert seen_progress == sorted(seen_progress)
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish: {job}")


def folder(job: dict) -> Path:
    return Path(job["folder"])


def test_sft_example_learns_and_evaluates_against_the_base_model(jobs_server):
    job_id = submit(jobs_server, example("sft.yaml"))
    job = wait(jobs_server, job_id)
    result = job["result"]
    print(f"\nsft example: train loss {result['first_train_loss']:.3f} -> "
          f"{result['last_train_loss']:.3f}, held-out {result['eval']['loss']:.3f}")
    assert result["last_train_loss"] < 0.8 * result["first_train_loss"]
    assert job["progress"] == 1.0 and job["step"] == job["total_steps"] == result["steps"]
    # the experiment folder
    out = folder(job)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints.jsonl", "training_history.json",
                 "eval_report.json", "log.txt", "result.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "adapter/adapter_config.json").read_text())["r"] == 16
    history = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    report = json.loads((out / "eval_report.json").read_text())
    assert {"loss", "perplexity", "exact_match", "bleu", "rouge1", "rougeL"} <= set(report)
    assert report["samples"][0]["meta"]["topic_tags"] == ["geography", "capitals"]
    # REST: logs, metrics, evaluate against the base model
    logs = api(jobs_server).get(f"/{job_id}/logs").text
    assert "sft job finished" in logs and "renderer qwen3_instruct" in logs
    metrics = api(jobs_server).get(f"/{job_id}/metrics").json()
    assert len([m for m in metrics["metrics"] if "loss" in m]) == result["steps"]
    assert metrics["history"] == history and metrics["checkpoints"]
    # the training runs it made carry its id: the one it trained, and the best one it exported
    assert metrics["runs"] and all(":train:" in r for r in metrics["runs"])
    assert result["state_path"].split("/")[2] in metrics["runs"]
    evaluated = api(jobs_server).post(f"/{job_id}/evaluate", json={"baseline": "base"}).json()
    table = {row["metric"]: row for row in evaluated["comparison"]}
    print(f"job vs base: loss {table['loss']['job']:.3f} vs "
          f"{table['loss']['base (tuneforge/tiny-qwen3)']:.3f}")
    assert table["loss"]["delta"] < -0.5
    assert evaluated["report"]["loss"] == pytest.approx(report["loss"], rel=1e-4)


def test_dpo_example_prefers_the_chosen_answers(jobs_server):
    job = wait(jobs_server, submit(jobs_server, example("dpo.yaml")))
    result = job["result"]
    print(f"\ndpo example: loss {result['first_train_loss']:.3f} -> "
          f"{result['last_train_loss']:.3f}, held-out accuracy {result['eval']['accuracy']}, "
          f"margin {result['eval']['margin']:.3f}")
    assert result["first_train_loss"] == pytest.approx(0.6931, abs=1e-3)  # starts at the reference
    assert result["last_train_loss"] < 0.3
    assert result["eval"]["accuracy"] == 1.0 and result["eval"]["margin"] > 0.5


def test_distill_example_student_matches_the_teacher_without_the_skill(jobs_server):
    job = wait(jobs_server, submit(jobs_server, example("distill.yaml")))
    result, out = job["result"], folder(job)
    teacher = rows(out / "teacher_data.jsonl")
    assert all(m["role"] != "system" for r in teacher for m in r["messages"])  # student: bare
    print(f"\ndistill example: student loss on held-out teacher answers "
          f"{result['eval']['loss']:.3f} (before training {result['eval']['base_model_loss']:.3f})")
    assert result["eval"]["loss"] < 0.75 * result["eval"]["base_model_loss"]
    assert "teacher tuneforge/tiny-qwen3 answered 12 prompts" in (out / "log.txt").read_text()
    # a checkpoint as the teacher (here the student just trained), with a plain system prompt
    teacher = {"model": result["sampler_path"], "system_prompt": "Be brief.", "max_tokens": 8}
    again = wait(jobs_server, submit(jobs_server, example("distill.yaml", teacher=teacher,
                                                          epochs=2)))
    log = (folder(again) / "log.txt").read_text()
    assert f"teacher {result['sampler_path']} answered 12 prompts" in log
    assert again["result"]["last_train_loss"] < again["result"]["first_train_loss"]


def test_rl_example_raises_the_reward_after_a_warm_start(jobs_server):
    warm = wait(jobs_server, submit(jobs_server, example("sft_boxed_warmup.yaml")))
    state = warm["result"]["state_path"]
    job = wait(jobs_server, submit(jobs_server,
                                   example("rl_boxed.yaml", load_checkpoint_path=state)))
    steps = [m for m in api(jobs_server).get(f"/{job['id']}/metrics").json()["metrics"]
             if "reward" in m]
    rewards = [s["reward"] for s in steps]
    print(f"\nrl example: reward by step {[round(r, 3) for r in rewards]}")
    assert len(steps) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05
    # sampler and trainer agree on the sampled tokens (on-policy)
    assert max(abs(s["kl_sampler_trainer"]) for s in steps) < 1e-3
    assert job["result"]["eval"]["samples"][0]["output"].startswith("\\boxed{")


def test_atomic_batch_isolates_a_broken_task_and_stops_a_plateau(jobs_server, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n'
                                           '{"prompt": "no response here"}\n')
    tasks = [{"name": p.stem, "data": rows(p)} for p in sorted((EXAMPLES / "tasks").glob("*"))]
    tasks += [{"name": "broken", "data": rows(tmp_path / "broken.jsonl")},
              {"name": "plateau", "data": rows(EXAMPLES / "tasks" / "upper.jsonl"),
               "learning_rate": 1e-9}]
    spec = example("atomic.yaml", tasks=tasks, max_concurrent=7)
    job = wait(jobs_server, submit(jobs_server, spec))
    out = folder(job)
    summary = json.loads((out / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["results"]}
    print(f"\natomic: {summary['completed']} completed, {summary['failed']} failed, "
          f"{summary['early_stopped']} stopped early; epochs "
          f"{ {n: r.get('epochs_trained') for n, r in by_name.items()} }")
    assert summary["tasks"] == 7 and summary["completed"] == 6 and summary["failed"] == 1
    broken = json.loads((out / "tasks/broken/metadata.json").read_text())
    assert broken["status"] == "failed" and "Traceback" in broken["traceback"]
    assert "data[1]: a supervised row needs 'prompt' and 'response'" in broken["error"]
    plateau = by_name["plateau"]
    assert plateau["early_stopped"] and plateau["epochs_trained"] < 6
    for name in ("upper", "reverse", "plural", "double", "greet"):
        meta = by_name[name]
        assert meta["status"] == "completed" and meta["examples"] == 8
        assert {"epochs_trained", "wall_seconds", "early_stopped", "best_epoch"} <= set(meta)
        history = json.loads((out / "tasks" / name / "training_history.json").read_text())
        assert len(history) == meta["epochs_trained"]
        assert all({"train_loss", "eval_loss"} <= set(h) for h in history)
        assert meta["last_train_loss"] < meta["first_train_loss"]
        assert (out / "tasks" / name / "adapter" / "adapter_model.safetensors").exists()
    metrics = api(jobs_server).get(f"/{job['id']}/metrics").json()
    assert set(metrics["tasks"]) == {"upper", "reverse", "plural", "double", "greet", "plateau"}
    assert len(metrics["runs"]) >= 6  # one per trained task at least, each its own session
    task = api(jobs_server).get(f"/{job['id']}/tasks/double/metrics").json()
    history = json.loads((out / "tasks" / "double" / "training_history.json").read_text())
    assert task["history"] == history and task["checkpoints"]
    assert len([m for m in task["metrics"] if "loss" in m]) == by_name["double"]["steps"]
    assert task["metadata"]["status"] == "completed"
    assert api(jobs_server).get(f"/{job['id']}/tasks/broken/metrics").json()[
        "metadata"]["status"] == "failed"
    for name in ("nope", "%2E%2E", "..%2F..%2Fdouble", "double%2F..%2F..%2Fdouble"):
        answer = api(jobs_server).get(f"/{job['id']}/tasks/{name}/metrics")
        assert answer.status_code == 404, (name, answer.text)
    evaluated = api(jobs_server).post(f"/{job['id']}/evaluate",
                                      json={"task": "double", "baseline": "base"}).json()
    assert evaluated["report"]["examples"] == 2
    # finished jobs and evaluations end their SDK sessions: no training model stays loaded
    loaded = [v for k, v in jobs_server.metrics().items()
              if k.startswith("tuneforge_training_models{")]
    assert loaded and sum(loaded) == 0, loaded


def test_bad_configs_cancel_and_isolation(jobs_server):
    http = api(jobs_server)
    bad = [({"type": "sft", "base_model": "tuneforge/tiny-qwen3", "data": [],
             "learnin_rate": 1}, "learnin_rate: unknown option"),
           ({**example("sft.yaml"), "lora_rank": 0}, "lora_rank"),
           ({**example("sft.yaml"), "dpo_beta": 0.1}, "dpo_beta: unknown option"),
           ({**example("sft.yaml"), "data": [{"prompt": "x"}]}, "data[0]"),
           ({**example("rl_boxed.yaml"), "grader": "os:system"},
            "grader: 'os:system' is Python code this server would run"),
           ({**example("sft.yaml"), "data": "/etc/passwd"},
            "data: '/etc/passwd' is outside the job files folder"),
           ({**example("sft.yaml"), "data": "../../secret.jsonl"}, "is outside the job files"),
           ({**example("distill.yaml"), "teacher": {"model": "m", "skill_file": "/etc/hosts"}},
            "teacher.skill_file: '/etc/hosts' is outside"),
           ({"base_model": "x"}, "type: required")]
    for spec, message in bad:
        answer = http.post("", json=spec)
        assert answer.status_code == 400 and message in answer.json()["detail"], answer.text
    assert http.get("/job-000000000000").status_code == 404
    # a long job, cancelled while it runs
    job_id = submit(jobs_server, example("sft.yaml", epochs=200, eval_split=0.0))
    wait(jobs_server, job_id, until=lambda j: (j["step"] or 0) >= 2)
    assert http.post(f"/{job_id}/cancel").json()["status"] in ("running", "cancelled")
    deadline = time.monotonic() + 120
    while http.get(f"/{job_id}").json()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.3)
    job = http.get(f"/{job_id}").json()
    assert job["status"] == "cancelled" and job["step"] < 800
    assert "cancelled" in http.get(f"/{job_id}/logs").text
    # another key sees none of it
    out = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--data-dir",
                          str(jobs_server.data_dir)], capture_output=True, text=True, check=True)
    other = api(jobs_server, out.stdout.split()[1])
    assert other.get("").json()["jobs"] == []
    assert other.get(f"/{job_id}").status_code == 404
    assert other.post(f"/{job_id}/cancel").status_code == 404


def test_restart_mid_job_resumes_from_the_last_checkpoint(tmp_path, models_dir):
    server = ServerProcess(tmp_path / "data", models_dir).start()
    try:
        spec = example("sft.yaml", epochs=12, save_every=3, eval_split=0.0)
        job_id = submit(server, spec)
        wait(server, job_id, until=lambda j: (j["step"] or 0) >= 8)
        server.proc.kill()
        server.proc.wait()
        server.start()
        job = wait(server, job_id, monotonic=False)
        assert job["restarts"] == 1
        out = folder(job)
        log = (out / "log.txt").read_text()
        assert "resumed from step" in log
        resumed_at = int(log.split("resumed from step ")[1].split()[0])
        assert resumed_at >= 6 and resumed_at % 3 == 0
        steps = [m["step"] for m in rows(out / "metrics.jsonl") if "loss" in m]
        # every step ran; the ones after the checkpoint possibly twice, none before it again
        assert sorted(set(steps)) == list(range(1, job["result"]["steps"] + 1))
        assert job["result"]["steps"] == 48  # 16 rows / batch 4 x 12 epochs
        assert steps.count(1) == 1 and all(steps.count(s) == 1 for s in range(1, resumed_at + 1))
        assert job["result"]["last_train_loss"] < 0.6 * job["result"]["first_train_loss"]
    finally:
        server.stop()


def test_cli_train_and_jobs(jobs_server, tmp_path, models_dir):
    env = {**os.environ, "TINKER_BASE_URL": jobs_server.base_url,
           "TINKER_API_KEY": jobs_server.api_key, "TUNEFORGE_MODELS_DIR": str(models_dir)}
    tf = [sys.executable, "-m", "tuneforge"]
    done = subprocess.run([*tf, "train", str(EXAMPLES / "sft.yaml"), "--out",
                           str(tmp_path / "exp"), "--data-dir", str(tmp_path / "data"),
                           "--threads", "1"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sft job sft on tuneforge/tiny-qwen3" in done.stdout
    assert "evaluation (held-out)" in done.stdout
    assert (tmp_path / "exp" / "adapter" / "adapter_model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: sft\nbase_model: tuneforge/tiny-qwen3\ndata: nowhere.jsonl\n")
    refused = subprocess.run([*tf, "train", str(bad), "--check"], capture_output=True,
                             text=True, env=env)
    assert refused.returncode == 1 and "data: no such file" in refused.stderr
    submitted = subprocess.run([*tf, "jobs", "submit", str(EXAMPLES / "sft.yaml")],
                               capture_output=True, text=True, env=env, check=True)
    job_id = submitted.stdout.split()[0]
    # by path: the server reads the files itself (they are inside its job files folder)
    by_path = subprocess.run([*tf, "jobs", "submit", "--no-inline", str(EXAMPLES / "dpo.yaml")],
                             capture_output=True, text=True, env=env, check=True)
    path_job = wait(jobs_server, by_path.stdout.split()[0])
    assert path_job["result"]["last_train_loss"] < path_job["result"]["first_train_loss"]
    logs = subprocess.run([*tf, "jobs", "logs", job_id, "--follow"], capture_output=True,
                          text=True, env=env, timeout=600, check=True)
    assert "sft job finished" in logs.stdout
    listed = subprocess.run([*tf, "jobs", "list"], capture_output=True, text=True, env=env,
                            check=True)
    assert job_id in listed.stdout and "completed" in listed.stdout
    status = json.loads(subprocess.run([*tf, "jobs", "status", job_id], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    assert status["status"] == "completed"
    evaluated = subprocess.run([*tf, "jobs", "evaluate", job_id, "--baseline", "base"],
                               capture_output=True, text=True, env=env, check=True)
    assert "delta" in evaluated.stdout and "perplexity" in evaluated.stdout


def test_schema_preview_and_errors_by_field(jobs_server):
    http = api(jobs_server)
    schema = http.get("/schema").json()  # not taken for a job id
    assert set(schema["types"]) == {"sft", "dpo", "rl", "distill", "atomic"}
    options = {o["name"]: o for o in schema["types"]["sft"]["options"]}
    assert options["lora_rank"]["minimum"] == 1 and options["lora_rank"]["maximum"] == 128
    assert options["data"]["type"] == "data" and options["train_on"]["type"] == "enum"
    assert all(o["help"] for t in schema["types"].values() for o in t["options"])
    # a bad config: today's text, and each problem by field
    bad = {**example("sft.yaml"), "learning_rate": 7, "lora_rank": 0}
    answer = http.post("", json=bad)
    assert answer.status_code == 400
    body = answer.json()
    assert body["category"] == "user" and body["detail"].startswith("invalid job config: ")
    assert {e["field"] for e in body["errors"]} == {"learning_rate", "lora_rank"}
    teacher = {**example("distill.yaml")["teacher"], "temperature": 5}
    body = http.post("", json=example("distill.yaml", teacher=teacher)).json()
    assert body["errors"][0]["field"] == "teacher.temperature"
    body = http.post("", json={**example("sft.yaml"), "data": "/etc/passwd"}).json()
    assert body["errors"] == [{"field": "data", "message": body["detail"][len("data: "):]}]
    # preview: the rows as the job trains on them
    config = example("sft.yaml", max_length=12)
    answer = http.post("/preview", json={"config": config, "limit": 3})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["total_examples"] == len(config["data"]) and len(out["examples"]) == 3
    for ex in out["examples"]:
        assert ex["max_length"] == 12 and ex["n_tokens"] == len(ex["tokens"]) <= 12
        assert ex["n_trained"] == sum(t["weight"] > 0 for t in ex["tokens"])
        assert {"id", "text", "weight"} == set(ex["tokens"][0])
    assert any(ex["truncated"] for ex in out["examples"])
    full = http.post("/preview", json={"config": example("sft.yaml"), "limit": 1}).json()
    [row] = full["examples"]
    trained = "".join(t["text"] for t in row["tokens"] if t["weight"] > 0)
    assert trained.startswith(config["data"][0]["response"]) and not row["truncated"]
    dpo = http.post("/preview", json={"config": example("dpo.yaml"), "limit": 1}).json()
    assert [e["side"] for e in dpo["examples"]] == ["chosen", "rejected"]
    for wrong, field in (({"config": {**config, "lora_rank": 0}}, "lora_rank"),
                         ({"config": config, "limit": 0}, "limit"),
                         ({"config": {**config, "data": "../x.jsonl"}}, "data"),
                         ({"config": {**config, "base_model": "no/such-model"}}, "base_model"),
                         ({}, "config")):
        answer = http.post("/preview", json=wrong)
        assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == field, \
            answer.text
    assert http.post("/preview", json={"config": config, "limt": 2}).status_code == 400
    # a submitted job's preview: the same rows
    job_id = submit(jobs_server, example("sft.yaml", epochs=1))
    mine = http.get(f"/{job_id}/preview", params={"limit": 1}).json()
    assert mine == full
    assert http.get("/job-000000000000/preview").status_code == 404
    wait(jobs_server, job_id)


def test_distill_from_a_skill_alone(jobs_server):
    """No data: the teacher writes the requests from SKILL.md, answers them, the student learns
    the answers (on the random tiny model the texts are noise; the mechanism is what counts)."""
    spec = example("distill.yaml", epochs=1, eval_split=0.0, generate_prompts=6)
    del spec["data"]
    spec["teacher"] = {**spec["teacher"], "max_tokens": 12}
    assert spec["teacher"]["system_prompt"].startswith("# Skill: describing animals")
    job = wait(jobs_server, submit(jobs_server, spec))
    out, result = folder(job), job["result"]
    prompts = rows(out / "generated_prompts.jsonl")
    texts = [p["prompt"] for p in prompts]
    assert len(texts) == 6 == result["generated_prompts"]
    assert all(t.strip() == t and t for t in texts) and len(set(texts)) == 6
    teacher = rows(out / "teacher_data.jsonl")
    assert [r["messages"][0] for r in teacher] == [{"role": "user", "content": t}
                                                   for t in texts]
    assert all(m["role"] != "system" for r in teacher for m in r["messages"])
    log = (out / "log.txt").read_text()
    assert "wrote 6 distinct requests" in log and "answered 6 prompts" in log
    assert result["steps"] == 2  # 6 answers, batches of 4, one epoch
    assert json.loads((out / "eval_report.json").read_text())["examples"] >= 1
    preview = api(jobs_server).get(f"/{job['id']}/preview").json()
    assert preview["total_examples"] == 6 and preview["examples"][0]["n_trained"] > 0


def step_losses(job: dict) -> list[float]:
    return [m["loss"] for m in rows(folder(job) / "metrics.jsonl") if "loss" in m]


def test_gradient_accumulation_equals_one_big_batch(jobs_server):
    """batch_size 2 x gradient_accumulation_steps 2 takes the same optimizer steps as batch_size
    4: the same rows per step, the same summed gradient (DPO's mean loss is scaled by each
    call's share), so the same losses after each update. The accumulated runs also turn on
    gradient checkpointing, which must not change a result either."""
    common = {"epochs": 1, "eval_split": 0.0, "eval_samples": 1, "lr_schedule": "constant"}
    pairs = {}
    for name in ("sft.yaml", "dpo.yaml"):
        big = submit(jobs_server, example(name, **common, batch_size=4))
        small = submit(jobs_server, example(name, **common, batch_size=2,
                                            gradient_accumulation_steps=2,
                                            gradient_checkpointing=True))
        pairs[name] = (big, small)
    for name, (big_id, small_id) in pairs.items():
        big, small = wait(jobs_server, big_id), wait(jobs_server, small_id)
        assert small["total_steps"] == big["total_steps"] == big["result"]["steps"] >= 2, name
        big_losses, small_losses = step_losses(big), step_losses(small)
        print(f"\n{name}: batch 4 losses {big_losses}\n{name}: 2 x 2 losses {small_losses}")
        assert len(small_losses) == len(big_losses) == big["result"]["steps"]
        # step 1 is before any update; step 2 onwards show the updates were the same
        assert small_losses == pytest.approx(big_losses, abs=1e-5), name
        assert small_losses[-1] != big_losses[0]  # (the adapter did move)


def test_a_qlora_job_trains_on_the_4bit_base(jobs_server):
    """`adapter: qlora` (the agent-skill spelling of quantization nf4): the training run and the
    DPO reference are both on tuneforge/tiny-qwen3@nf4, so DPO starts at log 2 (the policy is
    the reference); the runs carry gradient_checkpointing; the report's base is the 4-bit one."""
    import tinker

    spec = example("dpo.yaml", adapter="qlora", gradient_checkpointing=True)
    del spec["quantization"]  # ("none" in the dumped example: it would contradict qlora)
    job = wait(jobs_server, submit(jobs_server, spec))
    result, out = job["result"], folder(job)
    assert result["quantization"] == "nf4" and result["base_model"] == "tuneforge/tiny-qwen3"
    assert "dpo job dpo on tuneforge/tiny-qwen3@nf4 started" in (out / "log.txt").read_text()
    config = (out / "config.yaml").read_text()
    assert "quantization: nf4" in config and "adapter" not in config
    assert result["first_train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert result["last_train_loss"] < result["first_train_loss"]
    rest = tinker.RestClient(base_url=jobs_server.base_url, api_key=jobs_server.api_key)
    run = rest.get_training_run_by_tinker_path(result["state_path"]).result()
    assert run.base_model == "tuneforge/tiny-qwen3@nf4"
    assert run.user_metadata["gradient_checkpointing"] == "true"
    assert run.user_metadata["job_id"] == job["id"]
    evaluated = api(jobs_server).post(f"/{job['id']}/evaluate", json={"baseline": "base"}).json()
    assert evaluated["baseline"]["name"] == "base (tuneforge/tiny-qwen3@nf4)"
    # contradicting spellings are refused by field before anything runs
    answer = api(jobs_server).post("", json=example("dpo.yaml", adapter="lora",
                                                    quantization="nf4"))
    assert answer.status_code == 400
    assert {e["field"] for e in answer.json()["errors"]} == {"adapter", "quantization"}
