"""EWC (Kirkpatrick et al., 2017): after each task, the diagonal empirical Fisher of the trainable weights
on that task's data; later tasks pay λ/2·Σ F·(θ − θ*)². Fishers of successive tasks are summed and the
anchor θ* moves to the latest weights (the usual online form for long streams). On a LoRA, so the
penalty covers the adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolora.methods.base import LoraOptions
from evolora.methods.registry import register
from evolora.methods.seq_lora import SeqLoRA

FISHER, ANCHOR = "ewc.fisher.", "ewc.anchor."


@dataclass
class EWCOptions(LoraOptions):
    lambda_ewc: float = 5000.0
    fisher_examples: int = 256
    """Training examples used to estimate the Fisher (0 = all)."""

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_ewc < 0 or self.fisher_examples < 0:
            raise ValueError("lambda_ewc and fisher_examples must be >= 0")


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for name, f in fisher.items():
        term = (f * (params[name] - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    return 0.5 * total


@register
class EWC(SeqLoRA):
    name = "ewc"
    fsdp_ready = False  # the Fisher pass after a stage is not checked with a sharded model
    Options = EWCOptions

    def setup(self, model, ctx):
        model = super().setup(model, ctx)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        return model

    def loss_terms(self, step, ctx):
        if not self.fisher or not self.options.lambda_ewc:
            return {}
        params = dict(ctx.model.named_parameters())
        return {"ewc": self.options.lambda_ewc * ewc_penalty(params, self.fisher, self.anchor)}

    def after_stage(self, stage, ctx):
        from evolora.data.batching import collate_train
        from evolora.models import answer_loss

        model = ctx.model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        examples = [enc for t in ctx.stages[stage] for enc in ctx.encode_train(t)]
        if self.options.fisher_examples:
            examples = examples[: self.options.fisher_examples]
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
        batch_size = ctx.config.train.batch_size
        batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        for items in batches:
            batch = collate_train(items, ctx.tokenizer.pad_token_id).to(ctx.device)
            model.zero_grad(set_to_none=True)
            with ctx.accelerator.autocast():
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1)
                loss = answer_loss(out.logits, batch.labels)
            loss.backward()
            for n, p in named.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float().pow(2) / len(batches)
        model.zero_grad(set_to_none=True)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, torch.zeros_like(f)) + f
            self.anchor[n] = named[n].detach().float().clone()

    def checkpoint_state(self, model):
        state = super().checkpoint_state(model)
        state.update({FISHER + n: f for n, f in self.fisher.items()})
        state.update({ANCHOR + n: a for n, a in self.anchor.items()})
        return state

    def load_checkpoint_state(self, model, state):
        own = {k: v for k, v in state.items() if not k.startswith(("ewc.",))}
        super().load_checkpoint_state(model, own)
        # in the model's parameter order, as after_stage made them: the penalty sums its terms in this order
        names = [n for n, _ in model.named_parameters()]
        stray = [k for k in state if k.startswith((FISHER, ANCHOR)) and k.split(".", 2)[2] not in names]
        if stray:
            raise KeyError(f"checkpoint tensors not in the model: {stray[:3]}")
        self.fisher = {n: state[FISHER + n].float() for n in names if FISHER + n in state}
        self.anchor = {n: state[ANCHOR + n].float() for n in names if ANCHOR + n in state}
