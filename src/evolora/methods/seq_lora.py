"""Sequential LoRA: one PEFT LoRA adapter trained through the whole stream."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from evolora.methods.base import LoraOptions, Method, check_target_modules
from evolora.methods.registry import register


def add_lora(model, options: LoraOptions, adapter_name: str = "default"):
    check_target_modules(model, options.target_modules)
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, adapter_name=adapter_name)


@register
class SeqLoRA(Method):
    name = "seq_lora"
    Options = LoraOptions

    def setup(self, model, ctx):
        return add_lora(model, self.options)
