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


@dataclass
class ReplayBufferOptions:
    per_task: int = 50
    """Examples kept per earlier task."""

    def __post_init__(self):
        if self.per_task < 0:
            raise ValueError("per_task must be >= 0")


@dataclass
class ReplayOptions(ReplayBufferOptions, LoraOptions):
    def __post_init__(self):
        LoraOptions.__post_init__(self)
        ReplayBufferOptions.__post_init__(self)


class ReplayHooks:
    """The hooks both forms share; `options.per_task` is the buffer size."""

    def training_examples(self, stage, examples, ctx):
        earlier = sorted({t for s in range(stage) for t in ctx.stages[s]})
        seed = ctx.config.data.seed
        return examples + [enc for t in earlier for enc in replay_buffer(ctx, t, self.options.per_task, seed)]

    def extra_metrics(self):
        return {"replay_per_task": self.options.per_task}


@register
class Replay(ReplayHooks, SeqLoRA):
    name = "replay"
    fsdp_ready = True
    Options = ReplayOptions


@register_addon
class ReplayAddOn(ReplayHooks, AddOn):
    name = "replay"
    fsdp_ready = True
    Options = ReplayBufferOptions
