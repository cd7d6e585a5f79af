"""The tutoring package's config layout → the job spec (jobs/layouts.py), its experiment files'
arithmetic (jobs/experiments.py) and Ollama-style model names (engine/models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tuneforge.engine.models import OLLAMA_NAMES, ModelRegistry
from tuneforge.errors import UserError
from tuneforge.jobs import experiments, layouts
from tuneforge.jobs.spec import parse_spec, spec_to_dict

PACKAGE_CONFIG = yaml.safe_load("""
backend: local
model:
  base_model: "qwen3:8b"
data:
  train_file: "data/train.jsonl"
  eval_file: "data/eval.jsonl"
training:
  num_epochs: 3
  batch_size: 8
  learning_rate: 2e-5
""")


def config(**sections) -> dict:
    out = {"model": {"base_model": "tuneforge/tiny-qwen3"},
           "data": {"train_file": "train.jsonl"}}
    for name, body in sections.items():
        out[name] = {**out.get(name, {}), **body} if isinstance(body, dict) else body
    return out


def refused(raw: dict) -> UserError:
    with pytest.raises(UserError) as e:
        parse_spec(raw)
    return e.value


def test_the_package_config_maps_onto_an_sft_spec():
    layout = layouts.translate(PACKAGE_CONFIG)
    assert (layout.method, layout.backend, layout.output_dir) == ("sft", "local", None)
    assert layout.spec == {"type": "sft", "base_model": "qwen3:8b", "data": "data/train.jsonl",
                           "eval_data": "data/eval.jsonl", "epochs": 3, "batch_size": 8,
                           "learning_rate": "2e-5"}  # (YAML 1.1 reads 2e-5 as text)
    spec = parse_spec(PACKAGE_CONFIG, Path("/pkg"))
    assert spec.type == "sft" and spec.learning_rate == 2e-5 and spec.epochs == 3
    assert spec.data == "/pkg/data/train.jsonl" and spec.eval_data == "/pkg/data/eval.jsonl"


def test_every_package_key_lands_on_its_option():
    raw = config(model={"model_type": "causal_lm", "use_peft": True,
                        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                        "target_modules": ["q_proj", "v_proj", "k_proj",
                                                           "o_proj"]}},
                 data={"eval_file": "eval.jsonl", "max_seq_length": 512,
                       "prompt_template": "chat"},
                 training={"output_dir": "outputs/sft", "num_epochs": 2, "batch_size": 4,
                           "gradient_accumulation_steps": 2, "learning_rate": 1e-4,
                           "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
                           "logging_steps": 10, "eval_steps": 5, "save_steps": 7, "seed": 42})
    layout = layouts.translate(raw)
    assert layout.output_dir == "outputs/sft"
    spec = spec_to_dict(parse_spec(raw))
    assert {k: spec[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "max_length",
                                 "epochs", "batch_size", "gradient_accumulation_steps",
                                 "learning_rate", "eval_every", "save_every", "seed",
                                 "eval_data", "warmup_ratio", "weight_decay", "max_grad_norm",
                                 "train_attn", "train_mlp", "train_unembed")} == {
        "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "max_length": 512,
        "epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-4,
        "eval_every": 5, "save_every": 7, "seed": 42, "eval_data": "eval.jsonl",
        "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "train_attn": True,
        "train_mlp": False, "train_unembed": False}


def test_target_modules_are_whole_groups_and_null_grad_norm_means_no_clipping():
    spec = parse_spec(config(model={"peft_config": {"target_modules": [
        "gate_proj", "up_proj", "down_proj", "lm_head"]}}, training={"max_grad_norm": None}))
    assert (spec.train_attn, spec.train_mlp, spec.train_unembed) == (False, True, True)
    assert spec.max_grad_norm == 0.0


def test_tuneforge_options_under_their_own_name_in_their_section():
    spec = parse_spec(config(model={"quantization": "nf4", "lora_rank": 8},
                             training={"lr_schedule": "constant", "epochs": 2},
                             data={"train_on": "all_assistant_messages", "eval_split": 0.25}))
    assert (spec.quantization, spec.lora_rank, spec.lr_schedule, spec.epochs, spec.train_on,
            spec.eval_split) == ("nf4", 8, "constant", 2, "all_assistant_messages", 0.25)
    # an option in another group's section is unknown there
    assert refused(config(model={"epochs": 2})).fields[0]["field"] == "model.epochs"


def test_the_method_comes_from_the_key_or_the_sections():
    teacher = {"model": "tuneforge/tiny-qwen3", "system_prompt_file": "SKILL.md",
               "temperature": 0.5}
    distill = parse_spec(config(teacher=teacher), Path("/pkg"))
    assert distill.type == "distill" and distill.teacher.skill_file == "/pkg/SKILL.md"
    assert distill.teacher.temperature == 0.5
    generated = parse_spec({"method": "distillation", "model": {"base_model": "m"},
                            "teacher": teacher, "data": {"num_prompts": 5}})
    assert generated.generate_prompts == 5
    rl = parse_spec(config(rlvr={"grader": "boxed_number", "group_size": 8}))
    assert (rl.type, rl.grader, rl.group_size) == ("rl", "boxed_number", 8)
    assert parse_spec({**config(), "method": "rlvr"}).type == "rl"
    assert parse_spec({**config(), "method": "sft"}).type == "sft"
    assert "teacher" in refused({**config(teacher=teacher), "method": "sft"}).message
    assert refused({**config(), "method": "dpo"}).fields == [
        {"field": "method", "message": "one of sft, distillation, rlvr"}]
    assert refused({"method": "distillation", "model": {"base_model": "m"}}).fields[0][
        "field"] == "teacher"


@pytest.mark.parametrize("raw, field, words", [
    (config(training={"num_epoch": 3}), "training.num_epoch",
     "unknown option (not implemented or misspelt; did you mean training.num_epochs?)"),
    (config(model={"peft_config": {"rank": 4}}), "model.peft_config.rank", "unknown option"),
    (config(data={"test_file": "x"}), "data.test_file", "unknown option"),
    ({**config(), "trainig": {}}, "trainig", "did you mean training?"),
    (config(teacher={"model": "m", "temp": 1}), "teacher.temp", "unknown option"),
    (config(rlvr={"reward_fn": "x"}), "rlvr.reward_fn", "unknown option"),
    (config(training={"warmup_ratio": 0.9}), "training.warmup_ratio", "less than or equal"),
    (config(training={"weight_decay": -1}), "training.weight_decay", "greater than or equal"),
    (config(training={"logging_steps": 0}), "training.logging_steps", ">= 1"),
    (config(model={"use_peft": False}), "model.use_peft", "LoRA adapters only"),
    (config(model={"model_type": "seq2seq"}), "model.model_type", "causal_lm"),
    (config(model={"peft_config": {"target_modules": ["q_proj", "v_proj"]}}),
     "model.peft_config.target_modules", "q_proj, v_proj without k_proj, o_proj"),
    (config(model={"peft_config": {"target_modules": ["c_attn"]}}),
     "model.peft_config.target_modules", "c_attn: not a layer a job adapts"),
    (config(data={"prompt_template": "instruct"}), "data.prompt_template", "chat template"),
    ({**config(), "backend": "openai"}, "backend", "not one of local, tinker"),
    (config(training={"num_epochs": 2, "epochs": 3}), "training.epochs",
     "the same option as training.num_epochs"),
    (config(training={"learning_rate": 7}), "training.learning_rate", "less than or equal to 1"),
    (config(model={"peft_config": {"r": 0}}), "model.peft_config.r", "greater than or equal"),
    (config(teacher={"model": "m", "temperature": 5}), "teacher.temperature", "less than"),
    ({"model": {"data": "x"}, "data": {}}, "model.data", "unknown option"),
    ({"backend": "local", "data": {"train_file": "x"}}, "model.base_model", "Field required"),
    ({"backend": "local", "model": {"base_model": "m"}}, "data.train_file", "Field required"),
])
def test_refused_by_the_package_key(raw, field, words):
    error = refused(raw)
    assert field in [f["field"] for f in error.fields]
    assert f"{field}: " in error.message and words in error.message


def test_a_tuneforge_spec_is_not_a_layout():
    assert not layouts.is_layout({"type": "sft", "base_model": "m", "data": "x.jsonl"})
    assert not layouts.is_layout({"base_model": "m", "data": "x.jsonl"})
    assert layouts.is_layout({"backend": "tinker"}) and layouts.is_layout({"model": {}})
    with pytest.raises(UserError, match="type: required"):
        parse_spec({"base_model": "m", "data": "x.jsonl"})


def test_a_later_error_is_put_back_in_the_package_terms():
    layout = layouts.translate(PACKAGE_CONFIG)
    error = layouts.package_error(UserError("eval_data: no such file x.jsonl", fields=[
        {"field": "eval_data", "message": "no such file x.jsonl"}]), layout)
    assert error.message == "data.eval_file: no such file x.jsonl"
    assert error.fields == [{"field": "data.eval_file", "message": "no such file x.jsonl"}]
    assert layouts.package_error(UserError("epochs: too many"), layout).message == \
        "training.num_epochs: too many"
    distill = layouts.translate(config(teacher={"model": "m", "system_prompt_file": "S.md"}))
    assert layouts.package_error(UserError("teacher.skill_file: no such file S.md"),
                                 distill).message == "teacher.system_prompt_file: no such file S.md"


def test_the_mapping_table_names_every_key_it_accepts():
    documented = " ".join(row[0] for row in layouts.MAPPING)
    for section, renames in layouts.RENAMES.items():
        for key in renames:
            assert f"{section}.{key}" in documented
    for section, checked in layouts._CHECKED.items():
        for key in checked:
            assert f"{section}.{key}" in documented
    for key in layouts.PEFT_RENAMES:
        assert f"model.peft_config.{key}" in documented
    assert layouts.mapping_table().count("\n") == len(layouts.MAPPING) + 1


# ---- experiments ---------------------------------------------------------------------------


def test_the_package_answer_checks():
    assert experiments.matches("5", "The answer is 5.") == {
        "exact_match": False, "numeric_match": True, "partial_match": True}
    assert experiments.matches("$1,200", "1200") == {
        "exact_match": True, "numeric_match": True, "partial_match": True}
    assert experiments.matches("3/4", "0.75 of it")["numeric_match"]
    assert not experiments.matches("x", "x = 2")["numeric_match"]  # no number expected
    assert experiments.matches("12 cm", "12")["exact_match"]
    metrics, rows = experiments.math_accuracy([
        {"prompt": "a", "expected": "5", "actual": "5"},
        {"prompt": "b", "expected": "7", "actual": "it is 7 apples"},
        {"prompt": "c", "expected": "2", "actual": "three"}])
    assert metrics == {"exact_match_accuracy": 0.3333, "numeric_match_accuracy": 0.6667,
                       "partial_match_accuracy": 0.6667, "total_problems": 3}
    assert [r["numeric_match"] for r in rows] == [True, True, False]


def test_comparison_counts_changes_past_the_threshold_in_the_better_direction():
    base = {"model_name": "qwen3:8b", "evaluations": {
        "math_accuracy": {"numeric_match_accuracy": 0.5, "exact_match_accuracy": 0.2,
                          "partial_match_accuracy": 0.3, "total_problems": 4, "dataset": "d"},
        "text_quality": {"loss": 2.0, "perplexity": 7.389, "examples": 4}}}
    cur = {"model_name": "sft_001_x", "evaluations": {
        "math_accuracy": {"numeric_match_accuracy": 0.75, "exact_match_accuracy": 0.195,
                          "partial_match_accuracy": 0.1, "total_problems": 4, "dataset": "d"},
        "text_quality": {"loss": 1.5, "perplexity": 8.0, "examples": 4},
        "reward": {"reward": 1.0}}}
    c = experiments.compare(base, cur)
    assert (c["baseline"], c["current"]) == ("qwen3:8b", "sft_001_x")
    assert c["improvements"] == {
        "math_accuracy.numeric_match_accuracy": {"baseline": 0.5, "current": 0.75,
                                                 "improvement": 0.25},
        "text_quality.loss": {"baseline": 2.0, "current": 1.5, "improvement": 0.5}}
    assert set(c["regressions"]) == {"math_accuracy.partial_match_accuracy",
                                     "text_quality.perplexity"}
    assert c["regressions"]["text_quality.perplexity"]["regression"] == pytest.approx(0.611)
    # within 0.01: listed with its delta, neither better nor worse
    assert c["metrics"]["math_accuracy.exact_match_accuracy"]["delta"] == pytest.approx(-0.005)
    assert "text_quality.examples" not in c["metrics"] and "reward.reward" not in c["metrics"]


def test_experiment_folders_take_the_next_free_number(tmp_path):
    (tmp_path / "sft" / "sft_001_a").mkdir(parents=True)
    (tmp_path / "sft" / "sft_007_b").mkdir()
    (tmp_path / "sft" / "notes").mkdir()
    assert experiments.claim_folder(tmp_path, "sft", "my run!").name == "sft_008_my-run"
    assert experiments.claim_folder(tmp_path, "sft", "x").name == "sft_009_x"
    assert experiments.claim_folder(tmp_path, "distillation", "t").relative_to(tmp_path) == \
        Path("distillation/dist_001_t")
    assert experiments.claim_folder(tmp_path, "rlvr", "t").relative_to(tmp_path) == \
        Path("rlvr/rlvr_001_t")


# ---- Ollama-style names --------------------------------------------------------------------


def registry(**aliases) -> ModelRegistry:
    return ModelRegistry(Path("/nonexistent"), torch.device("cpu"), aliases=aliases)


def test_ollama_names_resolve_through_aliases_then_the_table():
    plain = registry()
    assert plain.spec("qwen3:8b").model == "Qwen/Qwen3-8B" == OLLAMA_NAMES["qwen3:8b"]
    assert plain.spec("qwen3:8b@nf4").model == "Qwen/Qwen3-8B"
    assert plain.spec("qwen3:8b@nf4").quantization == "nf4"
    assert plain.spec("Qwen/Qwen3-8B").model == "Qwen/Qwen3-8B"  # a Hugging Face id as it is
    aliased = registry(**{"qwen3:8b": "tuneforge/tiny-qwen3"})  # the operator's alias wins
    assert aliased.spec("qwen3:8b").model == "tuneforge/tiny-qwen3"
    assert aliased.spec("qwen3:8b@int8").model == "tuneforge/tiny-qwen3"
    assert aliased.spec("qwen3:8b@int8").quantization == "int8"
    with pytest.raises(UserError, match="base_model 'mistral:7b': no alias or local model "
                       "matches this Ollama-style name; add one with --alias "
                       "mistral:7b=MODEL or TUNEFORGE_MODEL_ALIASES"):
        plain.spec("mistral:7b")
    assert registry(**{"mistral:7b": "tuneforge/tiny-qwen3"}).spec("mistral:7b").model == \
        "tuneforge/tiny-qwen3"
