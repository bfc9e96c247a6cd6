"""One isolated LoRA per task, chosen by the task id at inference (oracle): no interference at all, so
no forgetting - the isolation upper bound that expert methods are measured against."""

from __future__ import annotations

import contextlib

from evolora.errors import EvoloraError
from evolora.methods.base import LoraOptions, Method
from evolora.methods.registry import register
from evolora.methods.seq_lora import activate_adapters, add_lora, ensure_task_adapter, task_adapter


@register
class PerTaskLoRA(Method):
    name = "per_task_lora"
    adapters_only = True
    Options = LoraOptions
    export_form = "lora"

    def export_adapters(self, task_index):
        if task_index is None:
            raise EvoloraError("--task: per_task_lora has one adapter per task; name the task to export")
        return [task_adapter(task_index)]

    def setup(self, model, ctx):
        self.model = add_lora(model, self.options, adapter_name=task_adapter(0))
        return self.model

    def grow(self, stage, ctx):
        name = ensure_task_adapter(self.model, self.options, stage)
        activate_adapters(self.model, [name], trainable=name)

    def answer_state(self, task_index):
        """The task's own adapter (none before its stage: the base model answers)."""
        marker = f".{task_adapter(task_index)}."
        return {name: p for name, p in self.model.named_parameters() if marker in name}

    @contextlib.contextmanager
    def route(self, task_index):
        if task_index is None:
            raise EvoloraError("per_task_lora needs the task id at inference (it has no task locator)")
        name = task_adapter(task_index)
        previous = self.model.base_model.active_adapter
        if name in self.model.peft_config:
            activate_adapters(self.model, [name], trainable=None)
            try:
                yield
            finally:
                activate_adapters(self.model, [previous] if isinstance(previous, str) else previous, trainable=None)
        else:  # a task not trained yet: the base model answers
            with self.model.disable_adapter():
                yield
