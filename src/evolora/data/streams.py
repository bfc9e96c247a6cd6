"""Task streams: the built-in benchmark orders, the offline demo, and custom lists of tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from evolora.config import DataConfig
from evolora.data.readers import read_olora_task, read_task
from evolora.data.tasks import Task, select_per_label
from evolora.errors import DataError

# The standard orders of the LLM continual-learning benchmark (O-LoRA, ProgPrompt).
ORDERS: dict[str, list[str]] = {
    "mtl5-1": ["yelp", "agnews", "dbpedia", "amazon", "yahoo"],
    "mtl5-2": ["dbpedia", "yahoo", "agnews", "amazon", "yelp"],
    "mtl5-3": ["yelp", "yahoo", "amazon", "dbpedia", "agnews"],
    "mtl5-4": ["agnews", "yelp", "amazon", "yahoo", "dbpedia"],
    "olora4-1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "olora4-2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "olora4-3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "long15-4": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
                 "dbpedia", "agnews", "MultiRC", "yahoo"],
    "long15-5": ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia",
                 "agnews", "yelp", "amazon", "yahoo"],
    "long15-6": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                 "yahoo", "MultiRC", "BoolQA", "WiC"],
}

TASK_FAMILY = {
    "agnews": "TC", "dbpedia": "TC", "yahoo": "TC",
    "yelp": "SC", "amazon": "SC", "IMDB": "SC", "SST-2": "SC",
    "MNLI": "NLI", "CB": "NLI", "RTE": "NLI",
    "QQP": "QQP", "BoolQA": "BoolQA", "MultiRC": "MultiRC", "WiC": "WiC", "COPA": "COPA",
}

# The benchmark's zero-shot instructions, used when instruction_config.json is not beside the data root.
DEFAULT_INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
           "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
           "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.\n",
    "COPA": "",
}

DATA_ROOT_ENV = "EVOLORA_DATA_ROOT"


def _instructions(root: Path) -> dict[str, str]:
    instructions = dict(DEFAULT_INSTRUCTIONS)
    for candidate in (root / "instruction_config.json", root.parent / "instruction_config.json"):
        if candidate.is_file():
            try:
                raw = json.loads(candidate.read_text(encoding="utf-8"))
                for family, entries in raw.items():
                    instructions[family] = entries[0]["instruction"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise DataError(f"{candidate}: unexpected instruction config ({exc})") from None
            break
    return instructions


def benchmark_root(config: DataConfig) -> Path:
    root = config.root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DataError(f"data.root: stream {config.stream} needs the benchmark folder "
                        f"(set data.root or ${DATA_ROOT_ENV}, e.g. ../shared/data/cl_benchmark/full)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder")
    return root


def stream_task_names(config: DataConfig) -> list[str]:
    return ORDERS[f"{config.stream}-{config.order}"]


def build_stream(config: DataConfig) -> list[Task]:
    if config.stream == "demo":
        from evolora.data.demo import demo_tasks

        tasks = demo_tasks(seed=config.seed)
    elif config.stream == "custom":
        tasks = [read_task(source) for source in config.tasks]
    else:
        root = benchmark_root(config)
        instructions = _instructions(root)
        tasks = [read_olora_task(name, root / name, instructions[TASK_FAMILY[name]])
                 for name in stream_task_names(config)]
    if config.max_tasks:
        tasks = tasks[: config.max_tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"data.tasks: task names must be unique, got {names}")
    if config.train_per_label or config.test_per_label or config.dev_per_label:
        tasks = [select_per_label(t, config.train_per_label, config.test_per_label, config.dev_per_label,
                                  config.seed) for t in tasks]
    return tasks
