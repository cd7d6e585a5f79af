"""What the cookbook's recipes need on a machine with no hub access, for the tests: stand-ins
for the Hugging Face datasets they load, written where `datasets` looks when offline, and a toy
task with a verifiable answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QUESTION_SUFFIX = " Provide a numerical answer without units, written inside \\boxed{}."
# The few-shot exchange rl_loop puts before every question (tinker_cookbook/recipes/rl_loop.py).
RL_PREFIX = [
    {"role": "user", "content": "How many r's are in strawberry?" + QUESTION_SUFFIX},
    {"role": "assistant", "content": "Let's spell the word out and number all the letters: "
     "1) s 2) t 3) r 4) a 5) w 6) b 7) e 8) r 9) r 10) y. We have r's at positions 3, 8, and 9. "
     "\\boxed{3}"},
]
# The toy task: one question with a verifiable answer. The supervised data teaches the format
# but labels only 40% of the answers correctly, so the SFT model answers right about 40% of the
# time; RL, rewarded for the true answer, has room to sharpen that.
QUESTION, ANSWER = "How many days are in a week?", 7
SFT_LABELS = (7, 7, 5, 6, 8)


def install_dataset(hf_home: Path, repo: str, config: str, rows: list[dict]) -> None:
    """Write `rows` as the cached train split of hub dataset `repo` / `config`, in the layout
    `datasets.load_dataset` reads when `HF_HUB_OFFLINE=1`."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    namespace, name = repo.split("/")
    folder = (hf_home / "datasets" / f"{namespace}___{datasets.naming.camelcase_to_snakecase(name)}"
              / config / "0.0.0" / "standin")
    if folder.exists():  # derived caches (shuffles) of an earlier version would be reused
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    table = datasets.Dataset.from_list(rows)
    with ArrowWriter(features=table.features, path=str(folder / f"{name}-train.arrow")) as w:
        w.write_table(table.data.table)
        count, size = w.finalize()
    info = datasets.DatasetInfo(
        features=table.features, dataset_name=name, config_name=config,
        splits=datasets.SplitDict({"train": datasets.SplitInfo("train", size, count,
                                                               dataset_name=name)}))
    info.write_to_directory(str(folder))


def conversations(path: Path) -> list[dict]:
    """The cookbook's example_data/conversations.jsonl as no_robots rows."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"messages": r["messages"], "category": "chat"} for r in rows]


def toy_sft_rows(repeats: int) -> list[dict]:
    """Chats in exactly the shape rl_loop prompts with, answered with a mix of labels."""
    return [{"messages": [*RL_PREFIX,
                          {"role": "user", "content": QUESTION + QUESTION_SUFFIX},
                          {"role": "assistant", "content": f"\\boxed{{{label}}}"}],
             "category": "toy"}
            for _ in range(repeats) for label in SFT_LABELS]


def toy_gsm8k_rows(count: int) -> list[dict]:
    """The question as GSM8K rows: the answer ends with '#### <number>'."""
    return [{"question": QUESTION, "answer": f"A week has {ANSWER} days.\n#### {ANSWER}"}] * count
