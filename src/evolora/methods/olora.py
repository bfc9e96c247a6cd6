"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"; reference
code `cmnfriend/O-LoRA`): a new LoRA per task, earlier ones frozen; the new adapter's A matrices are pushed
orthogonal to every old adapter's, loss + λ1·Σ_old Σ|A_old·A_newᵀ| + λ2·Σ_p ‖p‖₂ over the new adapter's
matrices; inference sums all adapters (no task id). Defaults: the reference's (docs/methods/olora.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evolora.methods.base import LoraOptions, Method
from evolora.methods.registry import register
from evolora.methods.seq_lora import activate_adapters, add_lora, ensure_task_adapter, task_adapter


@dataclass
class OLoRAOptions(LoraOptions):
    # The reference's LoRA (hard-coded in its run_uie_lora.py; targets: PEFT's default for Llama-family models)
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lambda_orth: float = 0.5
    lambda_l2: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_orth < 0 or self.lambda_l2 < 0:
            raise ValueError("lambda_orth and lambda_l2 must be >= 0")


def orthogonality(old: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Σ over old adapters of Σ|A_old · A_newᵀ| (A: r x d_in), the O-LoRA penalty for one layer."""
    return sum(torch.abs(a_old @ new.T).sum() for a_old in old) if old else new.new_zeros(())


@register
class OLoRA(Method):
    name = "olora"
    adapters_only = True
    Options = OLoRAOptions
    export_form = "lora"

    def export_adapters(self, task_index):
        """Every task's adapter: inference sums them all, whatever the task."""
        return sorted(self.model.peft_config, key=lambda name: int(name.rsplit("_", 1)[1]))

    def setup(self, model, ctx):
        self.model = add_lora(model, self.options, adapter_name=task_adapter(0))
        self.pairs: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.new_params: list[torch.Tensor] = []
        return self.model

    def grow(self, stage, ctx):
        name = ensure_task_adapter(self.model, self.options, stage)
        activate_adapters(self.model, [task_adapter(i) for i in range(stage + 1)], trainable=name)
        old_names = [task_adapter(i) for i in range(stage)]
        self.pairs, self.new_params = [], [p for p in self.model.parameters() if p.requires_grad]
        for module in self.model.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and name in lora_a:
                self.pairs.append(([lora_a[o].weight.detach() for o in old_names], lora_a[name].weight))

    def loss_terms(self, step, ctx):
        terms = {}
        if self.options.lambda_orth and self.pairs and self.pairs[0][0]:
            terms["orthogonality"] = self.options.lambda_orth * sum(orthogonality(old, new) for old, new in self.pairs)
        if self.options.lambda_l2:
            terms["l2"] = self.options.lambda_l2 * sum(torch.linalg.vector_norm(p) for p in self.new_params)
        return terms
