"""The console in a real Chromium against a real server: log in, watch an SDK run live, start
jobs from the form, the playground, the token viewer, atomic tasks, system, compare, and key
isolation. Every test also checks (in the fixture) that the page made no request to any origin
but the server's, and that no script error happened in it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tinker
from tinker import types

from tests.browser.conftest import Console

MODEL = "tuneforge/tiny-qwen3"
ROWS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
        for a in range(1, 5) for b in range(1, 4)]


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:]),
                                       "weights": np.ones(len(ids) - 1)})


def off_loop(fn, *args):
    """Run SDK calls on a thread of their own: Playwright's sync API keeps an event loop on the
    test's thread, and the SDK refuses blocking `.result()` calls from a thread with one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def new_run(sdk, text: str, steps: int, rank: int = 4, seed: int | None = None):
    """A training client trained `steps` steps on `text` (on a thread of its own)."""
    def work():
        tc = sdk.create_lora_training_client(base_model=MODEL, rank=rank, seed=seed).result()
        data = [datum(tc.get_tokenizer(), text)]
        return tc, data, train_steps(tc, data, steps)
    return off_loop(work)


def train_steps(tc, data, n: int, lr: float = 1e-2) -> list[float]:
    losses = []
    for _ in range(n):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


@pytest.fixture(scope="module")
def sdk(console_server) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=console_server.base_url,
                                api_key=console_server.api_key)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_login_refuses_a_bad_key_and_keeps_the_key_out_of_urls(console: Console):
    console.open()
    console.page.fill("#api-key", "tml-not-a-key")
    console.page.click("#login")
    console.page.wait_for_selector(".banner.error")
    assert "not valid" in console.page.inner_text(".banner.error")
    console.shot("login-refused")
    console.login()
    console.page.wait_for_selector("#runs-table table")
    console.shot("runs")
    key = console.server.api_key
    assert console.page.evaluate("sessionStorage.getItem('tuneforge.api_key')") == key
    assert all(key not in url for url in console.requests)


def test_run_page_gains_points_live_while_an_sdk_script_trains(console: Console, sdk):
    tc, data, _ = new_run(sdk, "The quick brown fox jumps over the lazy dog.", 1, rank=8)
    console.login()
    console.go(f"#/runs/{tc.model_id}")
    chart = console.page.locator('.chart[data-title="loss per token"]')
    wait_for(lambda: chart.get_attribute("data-points") == "1", 30, "the first point")
    console.page.evaluate("window.__same_page = true")
    n = 6
    losses = [None] + off_loop(train_steps, tc, data, n - 1)
    wait_for(lambda: chart.get_attribute("data-points") == str(n), 60, f"{n} points")
    assert console.page.evaluate("window.__same_page") is True  # no reload happened
    assert console.page.inner_text("#run-steps") == str(n)
    assert console.page.inner_text("#stream-state") == "● live"
    rows = console.api("GET", f"/api/runs/{tc.model_id}/metrics").json()["metrics"]
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert rows[-1]["loss_sum"] == pytest.approx(losses[-1], rel=1e-6)
    # checkpoints appear, with their download button
    off_loop(lambda: tc.save_state("ckpt-a").result())
    console.page.wait_for_selector("#checkpoints code:has-text('weights/ckpt-a')", timeout=20_000)
    with console.page.expect_download() as dl:
        console.page.locator("#checkpoints tr", has_text="ckpt-a").locator(
            "button", has_text="Download").click()
    assert dl.value.suggested_filename.endswith(".tar.gz")
    console.shot("run-live")


def new_job_form(console: Console, tab: str):
    """The New job page, logged in, on the form of `tab` (a job type, or "skill")."""
    console.login()
    console.go("#/new")
    console.page.click(f"#job-types button[data-type='{tab}']")
    form = console.page.locator("#job-form")
    form.locator("#opt-base_model").fill(MODEL)
    return form


def test_sft_job_from_the_form_completes_with_curves_and_report(console: Console, tmp_path):
    form = new_job_form(console, "sft")
    form.locator("#opt-data").set_input_files(write_jsonl(tmp_path / "sum.jsonl", ROWS))
    form.locator("#opt-epochs").fill("2")
    form.locator("#opt-batch_size").fill("4")
    form.locator("#opt-eval_split").fill("0.25")
    form.locator("#opt-learning_rate").fill("0.005")
    form.locator("#opt-lora_rank").fill("8")
    console.shot("new-sft")
    console.page.click("#start-job")
    console.page.wait_for_url("**/#/jobs/job-*")
    job_id = console.page.url.rsplit("/", 1)[1]
    wait_for(lambda: console.page.locator("#job-head .status.completed").count() == 1, 240,
             "the job to complete")
    job = console.api("GET", f"/api/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["type"] == "sft"
    loss_chart = console.page.locator('.chart[data-title="loss (train / held-out)"]')
    steps = len([m for m in console.api("GET", f"/api/jobs/{job_id}/metrics").json()["metrics"]
                 if "loss" in m])
    wait_for(lambda: loss_chart.get_attribute("data-points") not in (None, "0"), 20, "curves")
    assert steps == 6  # 9 training rows, batches of 4, two epochs
    assert int(loss_chart.get_attribute("data-points")) >= steps
    report = console.page.locator("#job-eval")
    report.locator("h2", has_text="Evaluation report").wait_for()
    assert "perplexity" in report.inner_text()
    assert console.page.locator("#job-history tbody tr").count() == 2
    console.page.locator("#job-log").filter(has_text="finished").wait_for()
    console.shot("job-sft")
    # evaluate against the base model: the comparison table appears
    console.page.select_option("#baseline", "base")
    console.page.click("#evaluate-job")
    console.page.locator("#comparison").wait_for(timeout=120_000)
    table = console.page.locator("#comparison table")
    assert "delta" in table.text_content().lower()
    loss_row = table.locator("tbody tr", has_text="perplexity").locator("td")
    job_ppl, base_ppl = (float(loss_row.nth(i).inner_text()) for i in (1, 2))
    assert job_ppl < base_ppl  # the trained adapter fits its held-out rows better than the base
    console.shot("job-sft-evaluated")
    console.go("#/jobs")
    row = console.page.locator("#jobs-table tbody tr", has_text=job_id)
    row.locator(".status.completed").wait_for()
    console.shot("jobs")


def test_a_bad_option_shows_the_servers_message_beside_its_field(console: Console, tmp_path):
    form = new_job_form(console, "sft")
    form.locator("#opt-data").set_input_files(write_jsonl(tmp_path / "d.jsonl", ROWS))
    form.locator("#opt-learning_rate").fill("5")
    console.page.click("#start-job")
    box = form.locator('[data-field="learning_rate"] .field-error')
    wait_for(lambda: box.inner_text().strip(), 20, "a field error")
    answer = console.api("POST", "/api/jobs", json={"type": "sft", "base_model": MODEL,
                                                    "data": ROWS, "learning_rate": 5})
    assert answer.status_code == 400
    expected = next(e["message"] for e in answer.json()["errors"]
                    if e["field"] == "learning_rate")
    assert box.inner_text().strip() == expected
    assert "1" in expected  # names the limit
    assert console.page.url.endswith("#/new")  # nothing started
    console.shot("new-bad-option")


def test_a_skill_md_alone_starts_a_distillation_job(console: Console, tmp_path):
    skill = tmp_path / "SKILL.md"
    skill.write_text("# Haiku helper\nWhen asked for a poem, answer with a haiku: three lines "
                     "of five, seven and five syllables.\n")
    form = new_job_form(console, "skill")
    form.locator("#skill-file").set_input_files(str(skill))
    form.locator("#opt-generate_prompts").fill("4")
    form.locator("#opt-teacher-max_tokens").fill("16")
    form.locator("#opt-learning_rate").fill("0.005")
    console.shot("new-skill")
    console.page.click("#start-job")
    console.page.wait_for_url("**/#/jobs/job-*")
    job_id = console.page.url.rsplit("/", 1)[1]
    final = wait_for(lambda: (j := console.api("GET", f"/api/jobs/{job_id}").json())["status"]
                     in ("completed", "failed") and j, 240, "the distillation job to end")
    assert final["type"] == "distill"
    assert final["status"] == "completed", final["error"]
    assert 1 <= final["result"]["generated_prompts"] <= 4  # the teacher wrote the requests
    console.page.locator("#job-head .status.completed").wait_for(timeout=20_000)
    console.shot("job-skill")


def memorised_adapter(sdk, question: str, reply: str) -> str:
    """A sampler checkpoint trained to answer `question` with `reply` (loss on the reply and
    its end-of-turn token only)."""
    tc = sdk.create_lora_training_client(base_model=MODEL, rank=16, seed=0).result()
    tok = tc.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = prompt_ids + tok.encode(reply, add_special_tokens=False) + [
        tok.convert_tokens_to_ids("<|im_end|>")]
    weights = np.zeros(len(ids) - 1, dtype=np.float32)
    weights[len(prompt_ids) - 1:] = 1.0
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(ids[1:]), "weights": weights})]
    for _ in range(150):
        loss = train_steps(tc, data, 1, lr=3e-3)[0] / weights.sum()
        if loss < 0.03:
            break
    assert loss < 0.1, f"the reply was not learnt (loss {loss})"
    return tc.save_weights_for_sampler("playground").result().path


def test_playground_answers_from_a_base_model_and_an_adapter_side_by_side(console: Console,
                                                                         sdk):
    reply = "Bonjour from the adapter."
    path = off_loop(memorised_adapter, sdk, "Say hello", reply)
    console.login()
    console.go(f"#/playground?model={path}")
    console.page.wait_for_selector("#model-0")
    assert console.page.input_value("#model-0") == path
    console.page.select_option("#model-1", MODEL)
    console.page.fill("#prompt", "Say hello")
    console.page.click("#send")
    answers = [console.page.locator(f"#chat-{i} .msg.answer").first for i in (0, 1)]
    for a in answers:
        a.wait_for(timeout=60_000)
    texts = [a.inner_text() for a in answers]
    expected = [console.api("POST", "/oai/api/v1/chat/completions", json={
        "model": m, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 64,
        "temperature": 0, "top_p": 1, "seed": 0}).json()["choices"][0]["message"]["content"]
        for m in (path, MODEL)]
    assert texts == expected
    assert texts[0] != texts[1]
    assert texts[0] == reply
    token = answers[0].locator(".lp").first
    assert "logprob" in token.get_attribute("title")
    assert float(token.get_attribute("data-logprob")) <= 0.0
    console.shot("playground")


def test_token_viewer_shows_weight_zero_and_one_tokens(console: Console, tmp_path):
    console.login()
    console.go("#/tokens")
    console.page.set_input_files("#token-file", write_jsonl(tmp_path / "t.jsonl", ROWS[:3]))
    console.page.fill("#token-base", MODEL)
    console.page.click("#show-file-tokens")
    console.page.wait_for_selector("#token-summary")
    zero = console.page.locator("#token-view .tok.w0").count()
    one = console.page.locator("#token-view .tok.w1").count()
    assert zero > 0 and one > 0
    preview = console.api("POST", "/api/jobs/preview", json={"config": {
        "type": "sft", "base_model": MODEL, "data": ROWS[:3], "max_length": 1024,
        "train_on": "last_assistant_message"}, "limit": 20}).json()
    assert one == sum(e["n_trained"] for e in preview["examples"])
    first = console.page.locator("#token-view .tok.w1").first
    assert "weight 1" in first.get_attribute("title") and "id " in first.get_attribute("title")
    console.shot("tokens")
    # truncation at max_length is marked
    console.page.fill("#token-max-length", "12")
    console.page.click("#show-file-tokens")
    mark = console.page.locator("#token-view .truncmark").first
    mark.wait_for()
    cut = console.api("POST", "/api/jobs/preview", json={"config": {
        "type": "sft", "base_model": MODEL, "data": ROWS[:3], "max_length": 12}}).json()
    assert cut["examples"][0]["truncated"]
    assert console.page.locator("#token-view .panel").first.locator(".tok").count() == 12
    assert str(cut["examples"][0]["cut_tokens"]) in mark.inner_text()
    console.shot("tokens-cut")


def test_atomic_job_lists_its_tasks_and_a_task_opens_its_curves(console: Console):
    tasks = [{"name": f"task-{i}", "data": ROWS[i:i + 6]} for i in range(3)]
    answer = console.api("POST", "/api/jobs", json={
        "type": "atomic", "base_model": MODEL, "tasks": tasks, "lora_rank": 4, "epochs": 2,
        "batch_size": 3, "learning_rate": 0.005, "eval_split": 0.34, "max_concurrent": 3})
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["id"]
    console.login()
    console.go(f"#/jobs/{job_id}")
    wait_for(lambda: console.api("GET", f"/api/jobs/{job_id}").json()["status"] == "completed",
             240, "the atomic job")
    rows = console.page.locator("#task-table tbody tr")
    wait_for(lambda: rows.count() == 3
             and console.page.locator("#task-table .status.completed").count() == 3, 30,
             "three completed tasks")
    assert console.page.locator("#task-table svg.spark polyline").count() == 3
    console.shot("job-atomic")
    console.page.fill("#job-tasks input.filter", "task-1")
    wait_for(lambda: rows.count() == 1, 10, "the filter")
    rows.first.locator("a").click()
    console.page.wait_for_url(f"**/#/jobs/{job_id}/tasks/task-1")
    chart = console.page.locator('.chart[data-title="loss (train / held-out)"]')
    wait_for(lambda: chart.get_attribute("data-points") not in (None, "0"), 20, "task curves")
    console.shot("job-atomic-task")


def test_system_and_compare_pages(console: Console, sdk):
    runs = [new_run(sdk, "Compare these two runs, please.", 3, seed=seed)[0].model_id
            for seed in (1, 2)]
    console.login()
    console.go("#/system")
    console.page.wait_for_selector("#engine-busy")
    assert "cores" in console.page.inner_text("#system-cards")
    workers = console.page.inner_text("#system-workers")
    assert "engine" in workers and "in-process" in workers and "up" in workers
    console.shot("system")
    console.go(f"#/compare?runs={','.join(runs)}")
    chart = console.page.locator('#compare-charts .chart[data-title="train loss"]')
    wait_for(lambda: chart.get_attribute("data-points") == "3", 20, "overlaid curves")
    legend = chart.text_content()
    # each run is a series of its own, named by its session's first characters and model
    assert all(f"{r[:8]}…{r[r.index(':'):]}" in legend for r in runs)
    console.shot("compare")


def test_a_second_key_sees_none_of_the_first_keys_runs_or_jobs(console: Console, second_key,
                                                              sdk):
    tc = new_run(sdk, "Private run.", 1)[0]
    console.login(second_key)
    console.page.wait_for_selector("#runs-table table")
    assert tc.model_id not in console.page.inner_text("#runs-table")
    assert "No training runs yet" in console.page.inner_text("#runs-table")
    console.go("#/jobs")
    console.page.wait_for_selector("#jobs-table table")
    assert "No jobs yet" in console.page.inner_text("#jobs-table")
    console.go(f"#/runs/{tc.model_id}")
    console.page.wait_for_selector("#run-info .banner.error")
    assert "not found" in console.page.inner_text("#run-info")
    console.shot("second-key")
