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
from tuneforge.jobs.loop import effective_batch, lr_at, micro_batches
from tuneforge.jobs.model import default_learning_rate, served_base
from tuneforge.jobs.rl import boxed_number, exact_match, load_grader
from tuneforge.jobs.runner import preflight
from tuneforge.jobs.spec import load_spec, parse_spec, spec_to_dict

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
    spec = SimpleNamespace(lr_schedule="linear", warmup_ratio=0.0)
    assert [lr_at(spec, 1.0, s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(SimpleNamespace(lr_schedule="constant", warmup_ratio=0.0), 1.0, 3, 4) == 1.0


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


def test_bad_options_are_listed_by_field():
    with pytest.raises(UserError) as err:
        parse_spec({**SFT, "learning_rate": 5, "learnin_rate": 1})
    fields = {f["field"]: f["message"] for f in err.value.fields}
    assert fields["learning_rate"] == "Input should be less than or equal to 1"
    assert fields["learnin_rate"] == "unknown option (not implemented or misspelt)"
    with pytest.raises(UserError) as err:
        parse_spec({"type": "distill", "base_model": "m", "data": [],
                    "teacher": {"model": "m", "temperature": 9}})
    assert err.value.fields == [{"field": "teacher.temperature",
                                 "message": "Input should be less than or equal to 2"}]
    with pytest.raises(UserError, match="patience needs held-out data") as err:
        parse_spec({**SFT, "patience": 2})
    assert [f["field"] for f in err.value.fields] == ["patience"]
    with pytest.raises(UserError) as err:
        parse_spec({**SFT, "type": "ppo"})
    assert [f["field"] for f in err.value.fields] == ["type"]
    with pytest.raises(UserError) as err:  # a file problem names its option too
        preflight(parse_spec({**SFT, "eval_data": [{"prompt": "only"}]}))
    assert err.value.fields[0]["field"] == "eval_data"
    assert "eval_data[0]: a supervised row needs" in err.value.fields[0]["message"]


def test_distillation_from_a_skill_alone():
    skill_only = {"type": "distill", "base_model": "m",
                  "teacher": {"model": "m", "system_prompt": "# Skill: greet"}}
    assert parse_spec(skill_only).generate_prompts == 16
    assert parse_spec({**skill_only, "generate_prompts": 3}).generate_prompts == 3
    with pytest.raises(UserError, match="generate_prompts: Input should be less than or equal "
                       "to 256"):
        parse_spec({**skill_only, "generate_prompts": 257})
    with pytest.raises(UserError, match="give data or generate_prompts, not both") as err:
        parse_spec({**skill_only, "data": [{"prompt": "p"}], "generate_prompts": 4})
    assert err.value.fields[0]["field"] == "generate_prompts"
    with pytest.raises(UserError, match="data is required unless the teacher has") as err:
        parse_spec({**skill_only, "teacher": {"model": "m"}})
    assert err.value.fields[0]["field"] == "data"
    assert parse_spec({**skill_only, "data": [{"prompt": "p"}]}).generate_prompts is None


def test_the_schema_comes_from_the_spec_models():
    from tuneforge.jobs.registry import TYPES
    from tuneforge.jobs.schema import schema

    types = schema()["types"]
    assert set(types) == set(TYPES) == {"sft", "dpo", "rl", "distill", "atomic"}
    for name, entry in types.items():
        assert entry["description"]
        names = [o["name"] for o in entry["options"]]
        assert names == [n for n in TYPES[name].spec.model_fields if n != "type"]
        for o in entry["options"]:
            assert o["help"], f"{name}.{o['name']} has no help text"
            assert o["group"] and o["type"] in ("string", "integer", "number", "boolean",
                                                "enum", "data", "object")
    sft = {o["name"]: o for o in types["sft"]["options"]}
    assert sft["lora_rank"] | {"help": ""} == {
        "name": "lora_rank", "type": "integer", "default": 32, "required": False, "help": "",
        "enum": None, "minimum": 1, "maximum": 128, "group": "model"}
    assert sft["data"]["type"] == "data" and sft["data"]["required"]
    assert sft["eval_data"]["type"] == "data" and not sft["eval_data"]["required"]
    assert sft["train_on"]["enum"] == ["last_assistant_message", "all_assistant_messages",
                                       "all_messages"]
    assert sft["learning_rate"]["minimum"] == 0 and sft["learning_rate"]["exclusive_minimum"]
    assert {o["name"]: o["default"] for o in types["rl"]["options"]}["batch_size"] == 4
    distill = {o["name"]: o for o in types["distill"]["options"]}
    assert not distill["data"]["required"]
    assert (distill["generate_prompts"]["minimum"], distill["generate_prompts"]["maximum"]) \
        == (1, 256)
    teacher = {o["name"]: o for o in distill["teacher"]["options"]}
    assert distill["teacher"]["type"] == "object"
    assert teacher["temperature"]["maximum"] == 2.0 and teacher["model"]["required"]


@pytest.fixture(scope="module")
def tiny_tokenizer(models_dir):
    import torch
    from transformers import AutoTokenizer

    from tuneforge.engine.models import ModelRegistry

    folder = ModelRegistry(models_dir, torch.device("cpu")).resolve("tuneforge/tiny-qwen3")
    return AutoTokenizer.from_pretrained(str(folder))


def test_preview_renders_rows_as_the_job_trains_on_them(tiny_tokenizer):
    from tinker_cookbook.supervised.data import conversation_to_datum

    from tuneforge.jobs.model import pick_renderer
    from tuneforge.jobs.preview import preview
    from tuneforge.jobs.supervised import train_on_what

    rows = [{"prompt": "What is the capital of France?", "response": "Paris"},
            {"prompt": "Name a colour.", "response": "Blue"}]
    spec = parse_spec({**SFT, "data": rows})
    out = preview(spec, tiny_tokenizer, limit=1)
    assert out["total_examples"] == 2 and len(out["examples"]) == 1
    [ex] = out["examples"]
    ids = [t["id"] for t in ex["tokens"]]
    # the datum the job trains on: the same tokens (shifted by one) and weights
    _, renderer = pick_renderer(None, spec.base_model, tiny_tokenizer)
    datum = conversation_to_datum(data.sft_example({**rows[0], "_where": "x"})["messages"],
                                  renderer, spec.max_length, train_on_what(spec.train_on),
                                  reduction="none")
    assert ids[1:] == datum.loss_fn_inputs["target_tokens"].tolist()
    assert [t["weight"] for t in ex["tokens"]][1:] == datum.loss_fn_inputs["weights"].tolist()
    trained = "".join(t["text"] for t in ex["tokens"] if t["weight"] > 0)
    assert trained.startswith("Paris") and ex["n_trained"] == sum(w > 0 for w in
                                                                  datum.loss_fn_inputs[
                                                                      "weights"].tolist())
    assert "".join(t["text"] for t in ex["tokens"]) == tiny_tokenizer.decode(ids)
    assert not ex["truncated"] and ex["n_tokens"] == len(ids) and ex["max_length"] == 1024
    cut = preview(parse_spec({**SFT, "data": rows, "max_length": 8}), tiny_tokenizer)
    first = cut["examples"][0]
    assert first["truncated"] and first["n_tokens"] == 8 and first["max_length"] == 8
    assert first["cut_tokens"] == len(ids) - 8 and [t["id"] for t in first["tokens"]] == ids[:8]
    everything = preview(parse_spec({**SFT, "data": rows, "train_on": "all_messages"}),
                         tiny_tokenizer, limit=1)["examples"][0]
    assert everything["n_trained"] > ex["n_trained"]


def test_preview_of_preference_and_rl_rows(tiny_tokenizer):
    from tuneforge.jobs.preview import preview

    dpo = parse_spec({"type": "dpo", "base_model": "tuneforge/tiny-qwen3",
                      "data": [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]})
    out = preview(dpo, tiny_tokenizer)
    assert out["total_examples"] == 1
    assert [(e["pair"], e["side"]) for e in out["examples"]] == [(0, "chosen"), (0, "rejected")]
    answers = ["".join(t["text"] for t in e["tokens"] if t["weight"] > 0)
               for e in out["examples"]]
    assert answers[0].startswith("4") and answers[1].startswith("5")
    rl = parse_spec({"type": "rl", "base_model": "tuneforge/tiny-qwen3", "max_length": 8,
                     "data": [{"prompt": "What is 2+2?", "answer": 4}]})
    [ex] = preview(rl, tiny_tokenizer)["examples"]
    assert ex["n_trained"] == 0 and ex["answer"] == "4" and ex["max_length"] is None
    assert ex["n_tokens"] > 8 and not ex["truncated"]  # prompts are not cut at max_length
    skill_only = parse_spec({"type": "distill", "base_model": "tuneforge/tiny-qwen3",
                             "teacher": {"model": "m", "system_prompt": "s"}})
    assert preview(skill_only, tiny_tokenizer) == {"examples": [], "total_examples": 0}


@pytest.mark.parametrize("given, quantization", [
    ({}, "none"),
    ({"quantization": "nf4"}, "nf4"),
    ({"quantization": "int8"}, "int8"),
    ({"adapter": "lora"}, "none"),
    ({"adapter": "qlora"}, "nf4"),  # QLoRA: NF4 unless told otherwise
    ({"adapter": "qlora", "quantization": "fp4"}, "fp4"),
    ({"adapter": "qlora", "quant_bits": 8}, "int8"),
    ({"quant_bits": 4}, "nf4"),
    ({"quant_bits": 8}, "int8"),
    ({"quant_bits": 4, "quantization": "fp4"}, "fp4"),
    ({"adapter": "qlora", "quant_bits": 4, "quantization": "nf4"}, "nf4"),
    ({"adapter": "lora", "quantization": "none"}, "none"),
])
def test_quantization_spellings_become_one_field(given, quantization):
    """adapter / quant_bits are the agent-skill spellings: after validation `quantization` holds
    the answer and they are gone, so config.yaml (and an atomic batch's tasks) carry one field."""
    spec = parse_spec({**SFT, **given})
    assert spec.quantization == quantization
    assert spec.adapter is None and spec.quant_bits is None
    dumped = spec_to_dict(spec)
    assert dumped["quantization"] == quantization
    assert "adapter" not in dumped and "quant_bits" not in dumped
    assert parse_spec(dumped).quantization == quantization  # config.yaml reads back the same
    assert served_base(spec) == ("tuneforge/tiny-qwen3" if quantization == "none"
                                 else f"tuneforge/tiny-qwen3@{quantization}")


@pytest.mark.parametrize("given, fields, words", [
    ({"adapter": "lora", "quantization": "nf4"}, ["quantization", "adapter"],
     "quantization: nf4 contradicts adapter: lora"),
    ({"adapter": "qlora", "quantization": "none"}, ["quantization", "adapter"],
     "quantization: none contradicts adapter: qlora"),
    ({"quant_bits": 8, "quantization": "nf4"}, ["quantization", "quant_bits"],
     "quantization: nf4 contradicts quant_bits: 8"),
    ({"quant_bits": 4, "quantization": "int8"}, ["quantization", "quant_bits"],
     "quantization: int8 contradicts quant_bits: 4"),
    ({"adapter": "lora", "quant_bits": 4}, ["adapter", "quant_bits"],
     "adapter: lora (a full-precision base) contradicts quant_bits: 4"),
    ({"quant_bits": 6}, ["quant_bits"], "quant_bits must be 4 or 8, not 6"),
    ({"quant_bits": 16}, ["quant_bits"], "less than or equal to 8"),
    ({"quantization": "q3"}, ["quantization"], "Input should be 'none', 'nf4', 'fp4' or 'int8'"),
    ({"adapter": "dora"}, ["adapter"], "Input should be 'lora' or 'qlora'"),
])
def test_contradicting_quantization_spellings_are_refused_by_field(given, fields, words):
    with pytest.raises(UserError, match="invalid job config") as err:
        parse_spec({**SFT, **given})
    assert words in err.value.message
    assert [f["field"] for f in err.value.fields] == fields  # the console marks each of them
    assert all(words in f["message"] for f in err.value.fields)


def test_quantization_reaches_the_tasks_of_an_atomic_batch():
    from tuneforge.jobs.atomic import task_spec

    parent = parse_spec({"type": "atomic", "base_model": "tuneforge/tiny-qwen3", "tasks": [],
                         "adapter": "qlora", "gradient_accumulation_steps": 3,
                         "gradient_checkpointing": True})
    task = task_spec(parent, {"name": "t", "data": [{"prompt": "a", "response": "b"}],
                              "gradient_accumulation_steps": 2})
    assert (task.quantization, task.gradient_accumulation_steps,
            task.gradient_checkpointing) == ("nf4", 2, True)


def test_a_task_sets_its_own_learning_rate_in_either_form():
    from tuneforge.jobs.atomic import task_spec

    rows = [{"prompt": "a", "response": "b"}]
    scaled = parse_spec({"type": "atomic", "base_model": "tuneforge/tiny-qwen3", "tasks": [],
                         "learning_rate_scale": 0.1})
    fixed = parse_spec({"type": "atomic", "base_model": "tuneforge/tiny-qwen3", "tasks": [],
                        "learning_rate": 1e-3})

    def rate(task):
        return task.learning_rate, task.learning_rate_scale

    assert rate(task_spec(scaled, {"name": "t", "data": rows})) == (None, 0.1)
    assert rate(task_spec(scaled, {"name": "t", "data": rows, "learning_rate": 2e-3})) == (
        2e-3, None)
    assert rate(task_spec(fixed, {"name": "t", "data": rows})) == (1e-3, None)
    assert rate(task_spec(fixed, {"name": "t", "data": rows, "learning_rate_scale": 0.5})) == (
        None, 0.5)
    with pytest.raises(UserError, match="learning_rate_scale"):
        task_spec(scaled, {"name": "t", "data": rows, "learning_rate_scale": 0})


def test_the_atomic_lora_summary_layout(tmp_path):
    """final_loss: the mean train loss of the epoch whose adapter is kept; epochs: trained."""
    from tuneforge.jobs.atomic import lora_summary, summary_entry

    history = [{"epoch": e, "step": 2 * e, "train_loss": loss, "eval_loss": ev}
               for e, loss, ev in ((1, 2.0, 1.9), (2, 1.5, 1.2), (3, 1.25, 1.3))]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "training_history.json").write_text(json.dumps(history))
    meta = {"status": "completed", "examples": 8, "train_examples": 6, "epochs_trained": 3,
            "early_stopped": True, "best_epoch": 2, "last_train_loss": 1.1,
            "training_seconds": 4.5}
    best = summary_entry(meta, tmp_path / "a")
    assert best == {"status": "success", "final_loss": 1.5, "epochs": 3,
                    "metadata": {"num_examples": 6, "num_epochs_trained": 3,
                                 "training_time_seconds": 4.5, "early_stopped": True}}
    last = summary_entry({**meta, "best_epoch": None, "early_stopped": False}, tmp_path / "a")
    assert last["final_loss"] == 1.25 and last["metadata"]["early_stopped"] is False
    failed = summary_entry({"status": "failed", "error": "ValueError: x",
                            "traceback": "Traceback ..."}, tmp_path / "b")
    assert failed == {"status": "failed", "error": "ValueError: x", "traceback": "Traceback ..."}
    assert lora_summary({"a": best, "b": failed}) == {"completed": 1, "failed": 1,
                                                      "tasks": {"a": best, "b": failed}}


def test_gradient_options():
    spec = parse_spec(SFT)
    assert (spec.gradient_accumulation_steps, spec.gradient_checkpointing) == (1, False)
    with pytest.raises(UserError) as err:
        parse_spec({**SFT, "gradient_accumulation_steps": 0})
    assert err.value.fields == [{"field": "gradient_accumulation_steps",
                                 "message": "Input should be greater than or equal to 1"}]
    spec = parse_spec({**SFT, "batch_size": 3, "gradient_accumulation_steps": 2})
    assert effective_batch(spec) == 6
    assert micro_batches(spec, list(range(6))) == [[0, 1, 2], [3, 4, 5]]
    assert micro_batches(spec, list(range(5))) == [[0, 1, 2], [3, 4]]  # an epoch's short tail


def test_gradient_checkpointing_is_merged_into_the_job_metadata():
    from tuneforge.jobs.context import JobContext

    def meta(job_id, **change):
        return JobContext(spec=parse_spec({**SFT, **change}), run=None, service=None,
                          job_id=job_id).user_metadata

    assert meta(None) is None and meta("job-1") == {"job_id": "job-1"}
    assert meta("job-1", gradient_checkpointing=True) == {"job_id": "job-1",
                                                          "gradient_checkpointing": "true"}
    assert meta(None, gradient_checkpointing=True) == {"gradient_checkpointing": "true"}


class RecordingClient:
    """A training client that records the order of its calls (futures resolve at once)."""

    def __init__(self):
        self.calls = []

    def _done(self, value):
        return SimpleNamespace(result=lambda: value)

    def forward_backward(self, data, loss_fn):
        self.calls.append(("forward_backward", list(data)))
        return self._done(SimpleNamespace(metrics={"loss:sum": float(len(data))}))

    def optim_step(self, params):
        self.calls.append(("optim_step", params.learning_rate))
        return self._done(None)


def test_an_accumulated_supervised_step_pipelines_its_calls():
    """batch_size rows per forward_backward, all submitted before the one optim_step; the loss
    is the per-example mean over the whole effective batch."""
    from tuneforge.jobs.supervised import Supervised

    ctx = SimpleNamespace(spec=parse_spec({**SFT, "batch_size": 2,
                                           "gradient_accumulation_steps": 3}))
    sup = Supervised(ctx, [], [])
    sup.datums = [f"d{i}" for i in range(6)]
    tc = RecordingClient()
    out = sup.step(tc, [5, 0, 3, 1, 4], 0.1)
    assert tc.calls == [("forward_backward", ["d5", "d0"]), ("forward_backward", ["d3", "d1"]),
                        ("forward_backward", ["d4"]), ("optim_step", 0.1)]
    assert out == {"loss": 1.0, "examples": 5}


def test_accumulated_dpo_gradients_equal_one_call_over_the_effective_batch():
    """compute_dpo_loss is a mean over its pairs: each call scales by its share of the step, so
    the summed gradient (and the weighted metrics) are those of the whole batch at once."""
    import torch

    from tuneforge.jobs.dpo import Preference

    torch.manual_seed(0)
    pref = Preference(SimpleNamespace(spec=SimpleNamespace(dpo_beta=0.5)), [], [])
    n_pairs, length = 4, 3
    data = [SimpleNamespace(loss_fn_inputs={"weights": torch.tensor([0.0, 1.0, 1.0])})
            for _ in range(2 * n_pairs)]
    refs = [(float(torch.randn(())), float(torch.randn(()))) for _ in range(n_pairs)]
    base = [torch.randn(length) for _ in range(2 * n_pairs)]

    def grads(pair_groups):
        logprobs = [t.clone().requires_grad_(True) for t in base]
        metrics = []
        for group in pair_groups:
            rows = [r for p in group for r in (2 * p, 2 * p + 1)]
            loss, m = pref._loss([refs[p] for p in group], len(group) / n_pairs)(
                [data[r] for r in rows], [logprobs[r] for r in rows])
            loss.backward()
            metrics.append((len(group), m))
        merged = {k: sum(n * m[k] for n, m in metrics) / n_pairs for k in ("dpo_loss",
                                                                            "accuracy")}
        return torch.stack([lp.grad for lp in logprobs]), merged

    whole, whole_metrics = grads([[0, 1, 2, 3]])
    split, split_metrics = grads([[0, 1], [2, 3]])
    assert torch.allclose(whole, split, atol=1e-7)
    assert split_metrics == pytest.approx(whole_metrics)


def test_the_schema_shows_the_new_options():
    from tuneforge.jobs.schema import schema

    for entry in schema()["types"].values():
        opts = {o["name"]: o for o in entry["options"]}
        assert opts["quantization"] | {"help": ""} == {
            "name": "quantization", "type": "enum", "default": "none", "required": False,
            "help": "", "enum": ["none", "nf4", "fp4", "int8"], "minimum": None,
            "maximum": None, "group": "model"}
        assert opts["adapter"]["enum"] == ["lora", "qlora"] and opts["adapter"]["nullable"]
        assert (opts["quant_bits"]["type"], opts["quant_bits"]["minimum"],
                opts["quant_bits"]["maximum"]) == ("integer", 4, 8)
        assert (opts["gradient_accumulation_steps"]["default"],
                opts["gradient_accumulation_steps"]["minimum"]) == (1, 1)
        assert opts["gradient_checkpointing"]["type"] == "boolean"
        assert not opts["gradient_checkpointing"]["default"]


def test_a_checkpoint_of_another_base_is_refused_for_a_quantized_job():
    """A checkpoint trains on the base it was saved from: asking for nf4 on a full-precision
    checkpoint would silently train on other weights."""
    from tuneforge.jobs.loop import _check_checkpoint_base

    def client(name):
        return SimpleNamespace(get_info=lambda: SimpleNamespace(model_name=name))

    nf4 = parse_spec({**SFT, "quantization": "nf4"})
    _check_checkpoint_base(nf4, client("tuneforge/tiny-qwen3@nf4"))
    _check_checkpoint_base(parse_spec(SFT), client("tuneforge/tiny-qwen3@nf4"))  # its own base
    for other in ("tuneforge/tiny-qwen3", "tuneforge/tiny-qwen3@int8"):
        with pytest.raises(UserError, match=f"trained on {other}, not on a nf4 base") as err:
            _check_checkpoint_base(nf4, client(other))
        assert [f["field"] for f in err.value.fields] == ["load_checkpoint_path",
                                                          "quantization"]


def test_an_accumulated_rl_step_samples_once_and_sends_one_call_per_batch():
    """Every prompt of the step is sampled from the same weights; its groups go out batch_size
    prompts per forward_backward (a group whose answers all got one reward is left out), then
    one optim_step."""
    from tuneforge.jobs.rl import Reinforce

    answers = {0: ["4", "5"], 1: ["7", "7"], 2: ["1", "2"]}  # row 1: one reward, teaches nothing

    class Sampler:
        def sample(self, prompt, n, params):
            row = prompt.to_ints()[0]
            seqs = [SimpleNamespace(tokens=[ord(a)], logprobs=[-0.5]) for a in answers[row]]
            return SimpleNamespace(result=lambda: SimpleNamespace(sequences=seqs))

    class Client(RecordingClient):
        def save_weights_and_get_sampling_client(self):
            self.calls.append(("sampler", None))
            return self._done(Sampler())

        def forward_backward(self, data, loss_fn):
            self.calls.append(("forward_backward", len(data)))
            outputs = [{"logprobs": SimpleNamespace(tolist=lambda: [-0.5])} for _ in data]
            return self._done(SimpleNamespace(metrics={"loss:sum": 1.0},
                                              loss_fn_outputs=outputs))

    spec = parse_spec({"type": "rl", "base_model": "m", "data": [{"prompt": "q", "answer": 4}],
                       "batch_size": 2, "gradient_accumulation_steps": 2, "group_size": 2})
    ctx = SimpleNamespace(spec=spec, progress=SimpleNamespace(step=0))
    rl = Reinforce(ctx, [{"answer": "4"}, {"answer": "7"}, {"answer": "1"}], [])
    rl.prompts = [[0], [1], [2]]
    rl.renderer = SimpleNamespace(get_stop_sequences=lambda: [],
                                  parse_response=lambda t: ({"content": chr(t[0])}, True))
    tc = Client()
    out = rl.step(tc, [0, 1, 2], 0.01)
    assert tc.calls == [("sampler", None), ("forward_backward", 2), ("forward_backward", 2),
                        ("optim_step", 0.01)]
    assert out["trained_sequences"] == 4 and out["reward"] == pytest.approx(4 / 6)
    assert out["loss"] == pytest.approx(2 / 4) and out["kl_sampler_trainer"] == 0.0
