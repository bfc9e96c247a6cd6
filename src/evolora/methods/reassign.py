"""Reassignment of answering experts (evolora's, not in the MoE-CL paper): after each stage every seen task is
answered by the expert (with its gate, and a shared snapshot) that does best on a few of the task's labelled
examples (its dev split when the stream has one), by answer loss or by error rate scored as evaluation scores
(`reassign_by: accuracy`). A task moves only when the score falls by more than `reassign_margin`.

A mixin for an expert method that provides `options` (reassign_examples, reassign_by, reassign_margin, seed,
shared_snapshots), `model`, `experts`, `tasks`, `tasks_with_experts`, `answerer` (per task: the task whose
expert answers it and the task whose shared snapshot does), `_use_expert(task, shared_of)` and
`answering_state(answer)` (the tensors `_use_expert(*answer)` answers with).

A candidate's score is kept with the fingerprint of those tensors (`eval.cache`): a frozen expert with a frozen
shared snapshot is scored once, not again at every stage; the choices are the same (tested). The kept scores
travel with the run folder (`kept_scores`), so a resumed run does not score them again either."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time

import torch

from evolora.data.prompting import Encoded
from evolora.data.tasks import Example, Task
from evolora.methods.base import fingerprint


class ReassignHooks:
    def _labelled_memory(self, task_index: int, ctx) -> list[Example]:
        """Up to `reassign_examples` of the task's dev examples, or of its train examples without a dev split."""
        task = ctx.tasks[task_index]
        return self._sample_raw(task, task.dev or task.train, self.options.reassign_examples, "reassign")

    def _sample_raw(self, task: Task, pool: list[Example], count: int, purpose: str) -> list[Example]:
        """`count` examples of `pool` (or all), drawn the same way every run."""
        rng = random.Random(f"moe_cl-{purpose}:{self.options.seed}:{task.name}")
        return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(count, len(pool))))]

    def _reassign_scorer(self, task_index: int, ctx):
        """What reassignment minimises for the task, as a function of its answerer (`reassign_by`), on its
        kept examples."""
        examples = self._labelled_memory(task_index, ctx)
        if self.options.reassign_by == "accuracy":
            return lambda answer: self._answer_error(task_index, examples, answer, ctx)
        task = ctx.tasks[task_index]
        encoded = [ctx.prompts.encode_train(task, ex, task_index) for ex in examples]
        return lambda answer: self._answer_loss(encoded, answer, ctx)

    @torch.no_grad()
    def _answer_error(self, task_index: int, examples: list[Example], answer: tuple[int, int], ctx) -> float:
        """Error rate (0-1) on the examples answered by `answer`, scored as evaluation scores test examples."""
        from evolora.evaluation import evaluate_task

        cfg = ctx.config.eval
        self.model.eval()
        with ctx.accelerator.autocast(), self._use_expert(*answer):
            result = evaluate_task(self.model, dataclasses.replace(ctx.tasks[task_index], test=examples), task_index,
                                   ctx.prompts, ctx.device, cfg.mode, cfg.batch_size, cfg.max_new_tokens,
                                   choice_norm=cfg.choice_norm)
        self.experts.clear()
        return 1.0 - result.correct / result.total

    @torch.no_grad()
    def _answer_loss(self, examples: list[Encoded], answer: tuple[int, int], ctx) -> float:
        """Mean answer loss of the examples answered by `answer`: (task whose expert and gate, task whose
        shared snapshot)."""
        from evolora.data.batching import collate_train
        from evolora.models import answer_loss

        self.model.eval()
        size = ctx.config.eval.batch_size
        total = 0.0
        with ctx.accelerator.autocast(), self._use_expert(*answer):
            for start in range(0, len(examples), size):
                part = examples[start:start + size]
                batch = collate_train(part, ctx.tokenizer.pad_token_id).to(ctx.device)
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1)
                total += answer_loss(out.logits, batch.labels).item() * len(part)
        self.experts.clear()
        return total / len(examples)

    def _reassign_settings(self, t: int, ctx) -> str:
        """Everything but the answering tensors that decides task `t`'s reassignment scores: the settings and
        the examples scored (the rest of the config is the engine's: `Method.kept_scores`)."""
        examples = [[e.input, e.output, e.instruction, list(e.choices or [])] for e in self._labelled_memory(t, ctx)]
        digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16]
        return f"{self.options.reassign_by}|{self.options.reassign_examples}|{self.options.seed}|{digest}"

    def _candidate_scores(self, t: int, candidates: list[tuple[int, int]], ctx) -> dict[tuple[int, int], float]:
        """Each candidate's score for task `t`: kept from an earlier stage while the tensors that answer with it
        and the reassignment settings are unchanged, else scored now."""
        cache = self.__dict__.setdefault("reassign_cache", {})
        keep = ctx.config.eval.cache and not ctx.partitioned  # a process holding part of the tensors: not kept
        settings = self._reassign_settings(t, ctx) if keep else None
        score, scores = None, {}
        for c in candidates:
            name, key = f"{t}:{c[0]}:{c[1]}", f"{settings}|{fingerprint(self.answering_state(c))}" if keep else None
            if key is not None and cache.get(name, (None,))[0] == key:
                scores[c] = cache[name][1]
                self.reassign_reused += 1
                continue
            score = score or self._reassign_scorer(t, ctx)
            scores[c] = score(c)
            if key is not None:
                cache[name] = (key, scores[c])
        return scores

    def kept_scores(self) -> dict:
        cache = self.__dict__.get("reassign_cache", {})
        return {"reassign": {name: [key, value] for name, (key, value) in cache.items()}} if cache else {}

    def restore_kept_scores(self, kept: dict) -> None:
        cache = {}
        for name, (key, value) in kept["reassign"].items():
            if not (isinstance(name, str) and isinstance(key, str) and isinstance(value, (int, float))):
                raise TypeError(f"reassignment score {name!r}")
            cache[name] = (key, float(value))
        self.reassign_cache = cache

    def reassign(self, stage: int, ctx, every_expert: bool = False) -> None:
        """Chooses the answerer of every task seen up to `stage` (module docstring); `every_expert` compares
        all experts for every task (a finished run re-evaluated with reassignment switched on)."""
        started, self.reassign_reused = time.perf_counter(), 0
        seen = sorted({t for s in range(stage + 1) for t in ctx.stages[s]})
        new = sorted(ctx.stages[stage])
        latest = new[-1]  # its snapshot is the shared expert as it is now
        margin = self.options.reassign_margin
        names = [t.name for t in ctx.tasks]
        for t in seen:
            fresh = t in new or every_expert
            current = (t, t) if fresh else tuple(self.answerer[t].tolist())
            candidates = {(e, e) for e in (seen if fresh else new)} | {current}
            if self.options.shared_snapshots:
                # the task's expert with the newest shared expert: a later task may have taught the shared
                # expert what this one needs
                candidates.add((current[0], latest))
            scores = self._candidate_scores(t, sorted(candidates), ctx)
            best = min(scores, key=scores.get)
            self.answerer[t] = torch.tensor(best if scores[best] < (1 - margin) * scores[current] else current)
            self.reassign_scores[names[t]] = {self._answer_name(c, names): round(v, 4) for c, v in scores.items()}
        self.reassign_s = time.perf_counter() - started

    @staticmethod
    def _answer_name(answer: tuple[int, int], names: list[str]) -> str:
        expert, shared = answer
        return names[expert] if expert == shared else f"{names[expert]} with {names[shared]}'s shared"

    def answerers(self) -> dict[str, str]:
        names = [t.name for t in self.tasks]
        return {names[t]: self._answer_name(tuple(a.tolist()), names) for t, a in enumerate(self.answerer)
                if t < self.tasks_with_experts}
