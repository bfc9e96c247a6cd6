"""LwF (Li & Hoiem, 2017), for instruction tuning: before a new task, the current model's answer-token
distributions on the new task's inputs are recorded (top-k, temperature T); while training, the model also
matches them (KL on the top-k tokens plus the rest of the vocabulary as one bucket), so it keeps behaving as
before on the inputs it now learns from. On a LoRA trained through the stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolora.data.prompting import IGNORE
from evolora.methods.base import LoraOptions
from evolora.methods.registry import register
from evolora.methods.seq_lora import SeqLoRA


@dataclass
class LwFOptions(LoraOptions):
    lambda_lwf: float = 1.0
    temperature: float = 2.0
    top_k: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_lwf < 0 or self.temperature <= 0 or self.top_k < 1:
            raise ValueError("need lambda_lwf >= 0, temperature > 0, top_k >= 1")


def _row_keys(batch) -> list[tuple]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def _with_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """Log-probs of the top-k tokens plus one bucket for the rest of the vocabulary."""
    mass = torch.logsumexp(top_logp, dim=-1, keepdim=True).exp().clamp(max=1 - 1e-6)
    return torch.cat([top_logp, torch.log1p(-mass)], dim=-1)


def distillation(student_logits: torch.Tensor, labels: torch.Tensor, teacher_idx: torch.Tensor,
                 teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the teacher to the student over answer positions, on the teacher's top-k tokens plus a bucket
    for the rest of the vocabulary (the exact KL when k is the vocabulary). Renormalising the teacher over its
    top-k alone would make the student push the rest of the vocabulary towards zero: an over-confident model.
    student_logits [B, K, V]; labels [B, K]; teacher_* [B, K, k] (teacher_logp: full-softmax log-probs)."""
    student_top = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_idx)
    teacher, student = _with_rest(teacher_logp.float()), _with_rest(student_top)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    mask = labels != IGNORE
    per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    return per_position.sum() / mask.sum().clamp(min=1) * temperature ** 2


@register
class LwF(SeqLoRA):
    name = "lwf"
    fsdp_ready = False  # the teacher's pass before a stage is not checked with a sharded model
    Options = LwFOptions

    def training_examples(self, stage, examples, ctx):
        self.teacher: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        if stage > 0 and self.options.lambda_lwf:
            self._record_teacher(examples, ctx)
        return examples

    @torch.no_grad()
    def _record_teacher(self, examples, ctx) -> None:
        from evolora.data.batching import collate_train

        model = ctx.model
        model.eval()
        size = ctx.config.eval.batch_size
        for start in range(0, len(examples), size):
            batch = collate_train(examples[start:start + size], ctx.tokenizer.pad_token_id).to(ctx.device)
            with ctx.accelerator.autocast():
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1)
            logits = out.logits[:, :-1].float() / self.options.temperature
            top = torch.log_softmax(logits, dim=-1).topk(self.options.top_k, dim=-1)
            for row, key in enumerate(_row_keys(batch)):
                keep = batch.labels[row] != IGNORE
                self.teacher[key] = (top.indices[row][keep].cpu(), top.values[row][keep].cpu())

    def loss_terms(self, step, ctx):
        if not getattr(self, "teacher", None):
            return {}
        batch = step.batch
        width = batch.labels.shape[1]
        k = self.options.top_k
        idx = torch.zeros(len(batch.labels), width, k, dtype=torch.long, device=batch.labels.device)
        logp = torch.zeros(len(batch.labels), width, k, device=batch.labels.device)
        for row, key in enumerate(_row_keys(batch)):
            keep = (batch.labels[row] != IGNORE).nonzero().squeeze(-1)
            t_idx, t_logp = self.teacher[key]
            idx[row, keep], logp[row, keep] = t_idx.to(idx.device), t_logp.to(logp.device)
        loss = distillation(step.outputs.logits[:, :-1], batch.labels, idx, logp, self.options.temperature)
        return {"lwf": self.options.lambda_lwf * loss}
