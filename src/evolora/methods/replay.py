"""Experience replay: a fixed buffer of N training examples of every earlier task is mixed into each
stage's training set, on a LoRA trained through the stream. The buffer is a seeded function of the
task, so a resumed run rebuilds exactly the same buffer."""

from __future__ import annotations

import random
from dataclasses import dataclass

from evolora.methods.base import LoraOptions
from evolora.methods.registry import register
from evolora.methods.seq_lora import SeqLoRA


@dataclass
class ReplayOptions(LoraOptions):
    per_task: int = 50
    """Examples kept per earlier task."""

    def __post_init__(self):
        super().__post_init__()
        if self.per_task < 0:
            raise ValueError("per_task must be >= 0")


def replay_buffer(ctx, task_index: int, size: int, seed: int) -> list:
    task = ctx.tasks[task_index]
    rng = random.Random(f"replay:{seed}:{task.name}")
    chosen = rng.sample(range(len(task.train)), min(size, len(task.train)))
    return [ctx.prompts.encode_train(task, task.train[i], task_index) for i in sorted(chosen)]


@register
class Replay(SeqLoRA):
    name = "replay"
    Options = ReplayOptions

    def training_examples(self, stage, examples, ctx):
        earlier = sorted({t for s in range(stage) for t in ctx.stages[s]})
        buffer = [enc for t in earlier for enc in replay_buffer(ctx, t, self.options.per_task, ctx.config.data.seed)]
        return examples + buffer

    def extra_metrics(self):
        return {"replay_per_task": self.options.per_task}
