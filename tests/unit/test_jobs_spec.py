"""Job configs, data rows, graders, the default learning rate and the text metrics: checked
without a server. (End-to-end runs: tests/integration/test_jobs.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.errors import UserError
from tuneforge.jobs import data, evaluate
from tuneforge.jobs.rl import boxed_number, exact_match, load_grader
from tuneforge.jobs.runner import default_learning_rate, lr_at, preflight
from tuneforge.jobs.spec import load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SFT = {"type": "sft", "base_model": "tuneforge/tiny-qwen3",
       "data": [{"prompt": "a", "response": "b"}]}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    spec = load_spec(path)
    preflight(spec)
    assert spec.name == path.stem and spec.base_model


def test_the_examples_cover_every_job_type():
    kinds = {load_spec(p).type for p in EXAMPLES.glob("*.yaml")}
    assert kinds == {"sft", "dpo", "rl", "distill", "atomic"}
    assert len(list((EXAMPLES / "tasks").glob("*.jsonl"))) == 5


@pytest.mark.parametrize("change, message", [
    ({"learnin_rate": 0.1}, "learnin_rate: unknown option"),
    ({"dpo_beta": 0.1}, "dpo_beta: unknown option"),  # an option of another job type
    ({"lora_rank": 0}, "lora_rank: Input should be greater than or equal to 1"),
    ({"lora_rank": 129}, "lora_rank: Input should be less than or equal to 128"),
    ({"eval_split": 0.9}, "eval_split: Input should be less than or equal to 0.5"),
    ({"train_on": "everything"}, "train_on: Input should be"),
    ({"eval_split": 0.2, "eval_data": []}, "give eval_split or eval_data, not both"),
    ({"load_checkpoint_path": "/tmp/x"}, "load_checkpoint_path: String should match"),
    ({"type": "ppo"}, "type"),
    ({"patience": 2}, "patience needs held-out data: set eval_split or eval_data"),
    ({"eval_every": 5}, "eval_every needs held-out data"),
])
def test_bad_options_are_refused_by_name(change, message):
    with pytest.raises(UserError, match="invalid job config") as err:
        parse_spec({**SFT, **change})
    assert message in err.value.message


def test_type_is_required_and_type_specific_rules_apply():
    with pytest.raises(UserError, match="type: required"):
        parse_spec({"base_model": "m", "data": []})
    with pytest.raises(UserError, match="teacher: .*give system_prompt or skill_file, not both"):
        parse_spec({"type": "distill", "base_model": "m", "data": [],
                    "teacher": {"model": "m", "system_prompt": "s", "skill_file": "f"}})
    with pytest.raises(UserError, match="group_size: Input should be greater than or equal to 2"):
        parse_spec({"type": "rl", "base_model": "m", "data": [], "group_size": 1})


def test_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "job.yaml").write_text("type: sft\nbase_model: m\ndata: sub/rows.jsonl\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.data == str(tmp_path / "sub" / "rows.jsonl") and spec.name == "job"
    preflight(spec)


def test_rows_are_checked_with_file_and_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r", "grade": 3}\n\n{"prompt": "only"}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:3: a supervised row needs 'prompt' and "):
        data.load_examples("sft", str(rows))
    rows.write_text('{"prompt": "p", "response": "r"}\n{not json\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: not valid JSON"):
        data.read_rows(str(rows))
    with pytest.raises(UserError, match=r"data\[0\]: 'answer' must be a string or a number"):
        data.load_examples("rl", [{"prompt": "q", "answer": [1]}])
    with pytest.raises(UserError, match=r"messages\[0\] must be"):
        data.load_examples("sft", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(UserError, match="no rows"):
        data.read_rows([])


def test_sft_rows_keep_their_metadata_and_messages():
    [ex] = data.load_examples("sft", [{"prompt": "q", "response": "a", "grade": "easy",
                                       "topic_tags": ["t"]}])
    assert ex["messages"] == [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]
    assert ex["meta"] == {"grade": "easy", "topic_tags": ["t"]}
    [chat] = data.load_examples("sft", [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]}])
    assert chat["messages"][1]["content"] == "a"


def test_split_is_seeded_and_disjoint():
    rows = list(range(20))
    train, held = data.split(rows, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == rows
    assert data.split(rows, 0.25, seed=3) == (train, held)
    assert data.split(rows, 0.25, seed=4)[1] != held


def test_atomic_task_listing(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    assert [t["name"] for t in data.load_tasks(str(tmp_path))] == ["a", "b"]
    with pytest.raises(UserError, match="repeats"):
        data.load_tasks([{"name": "a", "data": []}, {"name": "a", "data": []}])
    with pytest.raises(UserError, match="needs a 'name'"):
        data.load_tasks([{"name": "../x", "data": []}])


def test_graders():
    grade = boxed_number(0.1)
    assert grade("so \\boxed{7}", "7") == 1.0
    assert grade("\\boxed{1} then \\boxed{7.0}", "7") == 1.0  # the last box counts
    assert grade("\\boxed{8}", "7") == 0.1
    assert grade("\\boxed{seven}", "7") == 0.1
    assert grade("7", "7") == 0.0
    assert grade("\\boxed{1,000}", "1000") == 1.0
    assert exact_match(" Paris. ", "paris") == 1.0 and exact_match("Rome", "Paris") == 0.0


def test_a_user_grader_from_a_file(tmp_path):
    (tmp_path / "g.py").write_text("def score(response, answer):\n"
                                   "    return float(answer in response)\n")
    fn = load_grader(f"{tmp_path}/g.py:score")
    assert fn("it is 42", "42") == 1.0 and fn("no", "42") == 0.0
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_grader(f"{tmp_path}/g.py:nope")
    with pytest.raises(UserError, match="grader: no such file"):
        load_grader(f"{tmp_path}/missing.py:score")
    with pytest.raises(UserError, match="is not exact_match, boxed_number"):
        load_grader("fuzzy")
    assert load_grader("operator:contains")("it is 42", "42") is True  # module:function


def test_default_learning_rate(tmp_path):
    from tinker_cookbook import hyperparam_utils

    # a model the cookbook knows: its own formula
    assert default_learning_rate("Qwen/Qwen3-8B", None) == hyperparam_utils.get_lr("Qwen/Qwen3-8B")
    # a local model: family and hidden size from the served config.json
    for model_type, hidden, exponent in (("qwen3", 64, 0.0775), ("llama", 576, 0.781)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                          "hidden_size": hidden}))
        info = SimpleNamespace(model_data=SimpleNamespace(tokenizer_id=str(tmp_path)))
        expected = 5e-5 * 10 * (2000 / hidden) ** exponent
        assert math.isclose(default_learning_rate("local/model", info), expected, rel_tol=1e-12)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    info = SimpleNamespace(model_data=SimpleNamespace(tokenizer_id=str(tmp_path)))
    with pytest.raises(UserError, match="learning_rate: no default"):
        default_learning_rate("local/gpt", info)


def test_linear_schedule():
    spec = SimpleNamespace(lr_schedule="linear")
    assert [lr_at(spec, 1.0, s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(SimpleNamespace(lr_schedule="constant"), 1.0, 3, 4) == 1.0


def test_text_scores_and_comparison():
    same = evaluate.text_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["exact_match"] == 1.0 and same["bleu"] == pytest.approx(100.0)
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    other = evaluate.text_scores(["a dog ran"], ["the cat sat on the mat"])
    assert other["exact_match"] == 0.0 and other["bleu"] < 5 and other["rouge1"] == 0.0
    rows = evaluate.compare({"loss": 1.0, "examples": 3, "samples": []},
                            {"loss": 2.5, "examples": 3}, "job", "base")
    assert rows == [{"metric": "loss", "job": 1.0, "base": 2.5, "delta": -1.5}]
    assert "delta" in evaluate.format_table(rows)


def test_inline_files_carries_every_file_in_the_config():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = data.inline_files(load_spec(path))
        assert data.named_files(spec) == [], path.name  # nothing left for a server to read
        preflight(spec)
    distill = data.inline_files(load_spec(EXAMPLES / "distill.yaml"))
    assert distill.teacher.system_prompt == (EXAMPLES / "SKILL.md").read_text()
    atomic = data.inline_files(load_spec(EXAMPLES / "atomic.yaml"))
    assert [t["name"] for t in atomic.tasks] == ["double", "greet", "plural", "reverse", "upper"]
    assert all(isinstance(t["data"], list) and "_where" not in t["data"][0]
               for t in atomic.tasks)
    sft = load_spec(EXAMPLES / "sft.yaml")
    assert data.named_files(sft) == [("data", str(EXAMPLES / "data" / "capitals.jsonl"))]
