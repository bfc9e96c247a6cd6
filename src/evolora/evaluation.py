"""Evaluation: accuracy of a model on a task, by label log-likelihood (default) or greedy generation.

Log-likelihood scoring runs each prompt once, keeps only its last logit and its KV cache, then scores
every label continuation (answer + EOS) in one batched pass over the repeated cache: a 14-label task costs
one prompt forward plus a few-token forward, not 14 prompt forwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from evolora.data.batching import left_pad, right_pad
from evolora.data.prompting import PromptBuilder
from evolora.data.tasks import Task


@dataclass
class TaskResult:
    correct: int
    total: int
    predictions: list[str]
    score: Optional[float] = None
    """With metric rougeL and generated answers: the sum over examples of ROUGE-L F1 (0-1)."""

    @property
    def accuracy(self) -> float:
        """0-100"""
        return 100.0 * self.correct / self.total if self.total else 0.0


def _pad_candidates(candidates: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in candidates)
    ids = torch.full((len(candidates), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(candidates), width), dtype=torch.long)
    for i, c in enumerate(candidates):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return ids, mask


@torch.no_grad()
def score_candidates(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int,
                     device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Log P(candidate | prompt) summed over the candidate's tokens, for every prompt and candidate:
    a [len(prompts), len(candidates)] tensor."""
    cand_ids, cand_mask = _pad_candidates(candidates, pad_id)
    cand_ids, cand_mask = cand_ids.to(device), cand_mask.to(device)
    n_cand, cand_len = cand_ids.shape
    scores = torch.empty(len(prompts), n_cand)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # Keep the continuation pass (batch x candidates rows) to a bounded size.
    rows = max(1, min(batch_size, (batch_size * 8) // n_cand)) if cand_len > 1 else batch_size
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        ids, mask, positions = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad_id))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cand_len > 1,
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        batch_scores = first[:, cand_ids[:, 0]]
        if cand_len > 1:
            b = len(idx)
            # transformers >= 5.2x renamed past_key_values to cache (outputs and forward kwarg alike).
            cache_key = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
            cache = getattr(out, cache_key)
            cache.batch_repeat_interleave(n_cand)
            cont = cand_ids[:, :-1].repeat(b, 1)
            cont_mask = cand_mask[:, :-1].repeat(b, 1)
            full_mask = torch.cat([mask.repeat_interleave(n_cand, dim=0), cont_mask], dim=1)
            cont_pos = positions[:, -1:].repeat_interleave(n_cand, dim=0) + 1 + \
                torch.arange(cand_len - 1, device=device)
            out2 = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_pos,
                         use_cache=True, **{cache_key: cache})
            logp = torch.log_softmax(out2.logits.float(), dim=-1)
            targets = cand_ids[:, 1:].repeat(b, 1)
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * cand_mask[:, 1:].repeat(b, 1)
            batch_scores = batch_scores + token_logp.view(b, n_cand, -1).sum(-1)
        scores[idx] = batch_scores.float().cpu()
    return scores


@torch.no_grad()
def score_choices(model, prompts: list[list[int]], choices: list[list[list[int]]], pad_id: int,
                  device: torch.device, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, the summed log-likelihood of each of its own choices and their token counts. Each prompt
    runs once; its KV cache is repeated for its choices, which run in one batched pass (as label scoring)."""
    out_scores: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (len(choices[i]), len(prompts[i])))
    start = 0
    while start < len(order):  # a batch holds prompts with the same number of choices
        n = len(choices[order[start]])
        idx = [i for i in order[start:start + batch_size] if len(choices[i]) == n]
        start += len(idx)
        ids, mask, positions = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad_id))
        flat = [c for i in idx for c in choices[i]]
        cand_ids, cand_mask = (t.to(device) for t in _pad_candidates(flat, pad_id))
        width = cand_ids.shape[1]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=width > 1,
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n, dim=0)
        scores = first.gather(-1, cand_ids[:, :1]).squeeze(-1)
        if width > 1:
            cache_key = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
            cache = getattr(out, cache_key)
            cache.batch_repeat_interleave(n)
            full_mask = torch.cat([mask.repeat_interleave(n, dim=0), cand_mask[:, :-1]], dim=1)
            cont_pos = positions[:, -1:].repeat_interleave(n, dim=0) + 1 + torch.arange(width - 1, device=device)
            out2 = model(input_ids=cand_ids[:, :-1], attention_mask=full_mask, position_ids=cont_pos,
                         use_cache=True, **{cache_key: cache})
            logp = torch.log_softmax(out2.logits.float(), dim=-1)
            scores = scores + (logp.gather(-1, cand_ids[:, 1:].unsqueeze(-1)).squeeze(-1) * cand_mask[:, 1:]).sum(-1)
        scores, lengths = scores.view(len(idx), n).cpu(), cand_mask.sum(-1).view(len(idx), n).cpu()
        for row, i in enumerate(idx):
            out_scores[i] = (scores[row], lengths[row])
    return out_scores


@dataclass
class ChoiceResult:
    """Multiple choice: how many were right by summed log-likelihood (acc) and by per-token (acc_norm)."""

    correct: int
    correct_norm: int
    total: int
    predictions: list[str]
    """by the chosen normalisation"""

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0

    @property
    def accuracy_norm(self) -> float:
        return 100.0 * self.correct_norm / self.total if self.total else 0.0


def evaluate_choices(model, task: Task, task_index: int, prompts: PromptBuilder, device: torch.device,
                     batch_size: int = 16, norm: str = "tokens", plain: bool = False,
                     shard: tuple[int, int] = (0, 1)) -> ChoiceResult:
    """Each example's own choices scored after its prompt. `plain`: the prompt is the sentence alone and a
    choice follows it after a space (a general-knowledge probe, as lm-eval frames one); else the task's
    prompt (instruction, options, input, answer cue) and its answer format."""
    rank, world = shard
    examples = task.test[rank::world]
    if not examples:
        return ChoiceResult(0, 0, 0, [])
    tok = prompts.tokenizer
    if plain:
        bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []
        prompt_ids = [bos + tok(ex.input, add_special_tokens=False)["input_ids"][: prompts.max_input_tokens]
                      for ex in examples]
        choice_ids = [[tok(" " + c, add_special_tokens=False)["input_ids"] for c in ex.choices] for ex in examples]
    else:
        prompt_ids = [prompts.encode_prompt(task, ex, task_index).input_ids for ex in examples]
        choice_ids = [[prompts.answer_ids(c) for c in ex.choices] for ex in examples]
    scored = score_choices(model, prompt_ids, choice_ids, tok.pad_token_id, device, batch_size)
    correct = correct_norm = 0
    predictions = []
    for ex, (summed, lengths) in zip(examples, scored):
        by_sum = ex.choices[int(summed.argmax())]
        by_norm = ex.choices[int((summed / lengths.clamp(min=1)).argmax())]
        correct += by_sum == ex.output
        correct_norm += by_norm == ex.output
        predictions.append(by_norm if norm == "tokens" else by_sum)
    return ChoiceResult(correct, correct_norm, len(examples), predictions)


@torch.no_grad()
def generate_answers(model, prompts: list[list[int]], pad_id: int, eos_id: int, device: torch.device,
                     max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, _ = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad_id))
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1]:].tolist()
            outputs[i] = new[: new.index(eos_id)] if eos_id in new else new
    return outputs


def rouge_l(predictions: list[str], golds: list[str]) -> list[float]:
    """ROUGE-L F1 (0-1) of each prediction against its gold answer, by Google's rouge-score package (its default
    tokenizer: lower-cased ASCII words; text without any scores 0)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        from evolora.errors import ConfigError

        raise ConfigError("eval.metric: rougeL needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(gold, prediction)["rougeL"].fmeasure for prediction, gold in zip(predictions, golds)]


def evaluate_task(model, task: Task, task_index: int, prompts: PromptBuilder, device: torch.device,
                  mode: str = "loglik", batch_size: int = 16, max_new_tokens: int = 16,
                  shard: tuple[int, int] = (0, 1), choice_norm: str = "tokens", metric: str = "exact") -> TaskResult:
    """Accuracy on the task's test examples; with shard=(rank, world) only every world-th example."""
    rank, world = shard
    examples = task.test[rank::world]
    if not examples:
        return TaskResult(0, 0, [])
    if mode == "loglik" and all(ex.choices for ex in examples):  # multiple choice, each example its own options
        result = evaluate_choices(model, task, task_index, prompts, device, batch_size, choice_norm, shard=shard)
        return TaskResult(result.correct_norm if choice_norm == "tokens" else result.correct, result.total,
                          result.predictions)
    prompt_ids = [prompts.encode_prompt(task, ex, task_index).input_ids for ex in examples]
    pad_id = prompts.tokenizer.pad_token_id
    if mode == "loglik" and task.is_classification:
        candidates = [prompts.answer_ids(label) for label in task.labels]
        scores = score_candidates(model, prompt_ids, candidates, pad_id, device, batch_size)
        predictions = [task.labels[i] for i in scores.argmax(dim=1).tolist()]
    else:
        answers = generate_answers(model, prompt_ids, pad_id, prompts.eos_id, device, max_new_tokens, batch_size)
        predictions = [prompts.decode_answer(a) for a in answers]
        if metric == "rougeL":
            score = sum(rouge_l(predictions, [ex.output.strip() for ex in examples]))
            return TaskResult(sum(p == ex.output.strip() for p, ex in zip(predictions, examples)), len(examples),
                              predictions, score)
    correct = sum(p == ex.output.strip() for p, ex in zip(predictions, examples))
    return TaskResult(correct, len(examples), predictions)


@dataclass
class Perplexity:
    nll_sum: float
    tokens: int

    @property
    def value(self) -> float:
        import math

        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


@torch.no_grad()
def perplexity(model, sequences: list[list[int]], pad_id: int, device: torch.device, batch_size: int = 8,
               shard: tuple[int, int] = (0, 1)) -> Perplexity:
    """Token-level perplexity of the model on whole sequences (every token after the first is predicted).
    Returns the summed NLL and token count so shards can be added before exp()."""
    import torch.nn.functional as F

    rank, world = shard
    mine = sequences[rank::world]
    order = sorted(range(len(mine)), key=lambda i: len(mine[i]))
    nll, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        ids, mask = right_pad([mine[i] for i in order[start:start + batch_size]], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        count += int(mask[:, 1:].sum())
    return Perplexity(nll, count)
