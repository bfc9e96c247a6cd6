from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    instruction: Optional[str] = None
    """Overrides the task's instruction for this example (JSONL rows may carry their own)."""
    choices: Optional[tuple[str, ...]] = None
    """A multiple-choice example's own answer options (`output` is one of them); None: the task's labels."""


@dataclass
class Task:
    name: str
    instruction: str
    labels: list[str]
    """The answer set of a classification task; empty for free-form answers (scored by generation)."""
    train: list[Example]
    test: list[Example]
    dev: list[Example] = field(default_factory=list)

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)


def _group_by_label(examples: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.output].append(ex)
    return groups


def select_per_label(task: Task, train_per_label: int | None, test_per_label: int | None,
                     dev_per_label: int, seed: int) -> Task:
    """Stratified, seeded subsampling. The dev split is carved out of train, never out of test, from the far
    end of each label's shuffled pool, and only from what the training subsample leaves over: adding a dev split
    never changes what trains (a finished run can be re-evaluated with a dev split it never trained on); a label
    whose pool holds no more than `train_per_label` gets fewer dev examples, or none."""
    rng = random.Random(f"{seed}:{task.name}")
    train, dev = [], list(task.dev)
    for _label, group in sorted(_group_by_label(task.train).items()):
        group = list(group)
        rng.shuffle(group)
        carved = dev_per_label if train_per_label is None else min(dev_per_label, len(group) - train_per_label)
        if carved > 0:
            dev.extend(group[-carved:])
            group = group[:-carved]
        train.extend(group if train_per_label is None else group[:train_per_label])
    test = []
    for _label, group in sorted(_group_by_label(task.test).items()):
        group = list(group)
        rng.shuffle(group)
        test.extend(group if test_per_label is None else group[:test_per_label])
    rng.shuffle(train)
    return Task(task.name, task.instruction, task.labels, train, test, dev)
