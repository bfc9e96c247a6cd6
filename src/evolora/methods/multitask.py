"""Multitask LoRA: all tasks in one shuffled stage, the joint-training upper bound of a stream."""

from __future__ import annotations

from evolora.methods.registry import register
from evolora.methods.seq_lora import SeqLoRA


@register
class Multitask(SeqLoRA):
    name = "multitask"

    def stages(self, num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]
