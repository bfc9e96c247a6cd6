"""Length-grouped batches with left padding: every sequence ends at the last column, so the answer
tokens sit in the last few columns and the LM head is only applied there (`logits_to_keep`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from evolora.data.prompting import IGNORE, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    """The last K columns' tokens where they are answer tokens, IGNORE elsewhere (K = labels.shape[1]).
    They are predicted by the logits of columns T-K-1 .. T-2: run the model with `logits_to_keep=K+1`
    and drop the last logit."""
    task_ids: torch.Tensor
    n_tokens: int

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.labels.to(device), self.task_ids.to(device), self.n_tokens)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences (for perplexity and general replay), padded on the right: ids and mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def collate_train(items: list[Encoded], pad_id: int) -> Batch:
    ids, mask, positions = left_pad([it.input_ids for it in items], pad_id)
    answer_lens = [len(it.input_ids) - it.prompt_len for it in items]
    keep = max(answer_lens)
    labels = torch.full((len(items), keep), IGNORE, dtype=torch.long)
    for row, (it, n) in enumerate(zip(items, answer_lens)):
        labels[row, keep - n:] = torch.tensor(it.input_ids[it.prompt_len:], dtype=torch.long)
    task_ids = torch.tensor([it.task_index for it in items], dtype=torch.long)
    return Batch(ids, mask, positions, labels, task_ids, int(mask.sum()))


def length_grouped_batches(items: list[Encoded], batch_size: int, seed: int, pool: int = 50) -> list[list[Encoded]]:
    """Shuffle, then sort within pools of `pool` batches by length, so a batch holds similar lengths
    (little padding) while the order of batches stays random."""
    rng = random.Random(seed)
    order = list(items)
    rng.shuffle(order)
    batches = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda it: len(it.input_ids))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
