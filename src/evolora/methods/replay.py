"""Experience replay: a fixed buffer of N training examples of every earlier task is mixed into each
stage's training set. The buffer is a seeded function of the task, so a resumed run rebuilds exactly the
same buffer. Two forms: the method `replay` (a LoRA trained through the stream, as in the literature's
baseline) and the add-on `replay`, which puts the same buffer under any method (e.g. `moe_cl+replay`).
Each stored example keeps its task id, so a method that routes by task (moe_cl, per-task experts) sends it
through that task's parameters in the mixed batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

from evolora.methods.addons import AddOn
from evolora.methods.base import LoraOptions
from evolora.methods.registry import register, register_addon
from evolora.methods.seq_lora import SeqLoRA


def replay_buffer(ctx, task_index: int, size: int, seed: int) -> list:
    task = ctx.tasks[task_index]
    rng = random.Random(f"replay:{seed}:{task.name}")
    chosen = rng.sample(range(len(task.train)), min(size, len(task.train)))
    return [ctx.prompts.encode_train(task, task.train[i], task_index) for i in sorted(chosen)]


def earlier_buffers(ctx, stage: int, per_task: int) -> list:
    earlier = sorted({t for s in range(stage) for t in ctx.stages[s]})
    return [enc for t in earlier for enc in replay_buffer(ctx, t, per_task, ctx.config.data.seed)]


@dataclass
class ReplayBufferOptions:
    per_task: int = 50
    """Examples kept per earlier task."""

    def __post_init__(self):
        if self.per_task < 0:
            raise ValueError("per_task must be >= 0")


@dataclass
class ReplayOptions(LoraOptions):
    per_task: int = 50
    """Examples kept per earlier task."""

    def __post_init__(self):
        super().__post_init__()
        ReplayBufferOptions.__post_init__(self)


@register
class Replay(SeqLoRA):
    name = "replay"
    Options = ReplayOptions

    def training_examples(self, stage, examples, ctx):
        return examples + earlier_buffers(ctx, stage, self.options.per_task)

    def extra_metrics(self):
        return {"replay_per_task": self.options.per_task}


@register_addon
class ReplayAddOn(AddOn):
    name = "replay"
    Options = ReplayBufferOptions

    def training_examples(self, stage, examples, ctx):
        return examples + earlier_buffers(ctx, stage, self.options.per_task)

    def extra_metrics(self):
        return {"replay_per_task": self.options.per_task}
