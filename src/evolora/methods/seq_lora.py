"""Sequential LoRA: one PEFT LoRA adapter trained through the whole stream."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from evolora.methods.base import LoraOptions, Method, check_target_modules
from evolora.methods.registry import register
from evolora.models import quiet_peft_wrapping


def lora_config(options: LoraOptions) -> LoraConfig:
    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")


def add_lora(model, options: LoraOptions, adapter_name: str = "default"):
    check_target_modules(model, options.target_modules)
    with quiet_peft_wrapping():
        return get_peft_model(model, lora_config(options), adapter_name=adapter_name)


def task_adapter(task_index: int) -> str:
    return f"task_{task_index}"


def ensure_task_adapter(model, options: LoraOptions, task_index: int) -> str:
    """Adds the task's own LoRA adapter if the model does not have it yet; returns its name."""
    name = task_adapter(task_index)
    if name not in model.peft_config:
        model.add_adapter(name, lora_config(options))
    return name


def activate_adapters(model, active: list[str], trainable: str | None) -> None:
    """Makes `active` the summed set of adapters; only `trainable`'s weights get gradients."""
    model.base_model.set_adapter(active if len(active) > 1 else active[0])
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is not None and f".{trainable}." in name)


@register
class SeqLoRA(Method):
    name = "seq_lora"
    adapters_only = True
    fsdp_ready = True
    Options = LoraOptions
    export_form = "lora"

    def setup(self, model, ctx):
        return add_lora(model, self.options)
