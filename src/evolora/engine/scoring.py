"""Scoring during a run: a row of R (task ids given, or found by the method's task locator), the zero-shot
row (cached on disk), per-example predictions, and general ability (held-out perplexity, general knowledge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from evolora import atomic
from evolora.engine.context import RunContext, autocast_dtype
from evolora.engine.sharding import eval_shard
from evolora.engine.state import guarded_write
from evolora.runfolder import STATE
from evolora.errors import EvoloraError
from evolora.evaluation import evaluate_task
from evolora.methods import Method
from evolora.methods.base import fingerprint


def tasks_to_evaluate(policy: str, seen_upto: int, num_tasks: int) -> list[int]:
    """Seen tasks, plus the future tasks the policy asks for (`next` is enough for FWT)."""
    last = {"all": num_tasks - 1, "next": min(seen_upto + 1, num_tasks - 1), "none": seen_upto}[policy]
    return list(range(0, last + 1))


def _cached(ctx: RunContext, folder: str, key: dict, compute):
    """A base-model figure cached on disk under everything it depends on (`key`, plus the model, the precision
    and evolora's version), so the runs of a suite share it; every process takes the same branch."""
    import hashlib

    from evolora import __version__
    from evolora.models import cache_dir

    key_source = json.dumps({**key, "model": ctx.config.model.model_dump(),
                             "autocast": autocast_dtype(ctx.config, ctx.model), "version": __version__}, sort_keys=True)
    path = cache_dir() / folder / f"{hashlib.sha256(key_source.encode()).hexdigest()[:20]}.json"
    value = None
    if ctx.accelerator.is_main_process and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            value = cached["value"] if cached.get("key") == key_source else None
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
            value = None
    if ctx.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        value = broadcast_object_list([value])[0]
    if value is None:
        value = compute()
        if ctx.accelerator.is_main_process:
            atomic.write_json(path, {"key": key_source, "value": value})
    return value


def _content_hash(paths: list[str]) -> str:
    """sha256 of the files (a folder: every file under it, by relative path): a changed input is a new key."""
    import hashlib

    digest = hashlib.sha256()
    for name in paths:
        root = Path(name)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def zero_shot_row(ctx: RunContext) -> list[Optional[float]]:
    """Accuracy of the base model on every task, before any method touches it (cached on disk)."""
    import hashlib

    probe = [ctx.prompts.encode_prompt(t, t.test[0], i).input_ids + ctx.prompts.answer_ids(t.test[0].output)
             for i, t in enumerate(ctx.tasks)]  # catches prompt-format, tokenizer and data changes
    probe_hash = hashlib.sha256(json.dumps([probe, [len(t.test) for t in ctx.tasks]]).encode()).hexdigest()
    key = {"data": ctx.config.data.model_dump(), "probe": probe_hash,
           "eval": ctx.config.eval.model_dump(include={"mode", "batch_size", "max_new_tokens", "choice_norm",
                                                            "metric"})}
    return _cached(ctx, "zero_shot", key,
                   lambda: evaluate_row(ctx, Method(), list(range(len(ctx.tasks))))[0])


def base_general_perplexity(ctx: RunContext) -> Optional[float]:
    """`general_perplexity` of the base model (cached on disk: each run of a suite would measure the same)."""
    cfg = ctx.config.eval
    if not cfg.general_text:
        return None
    key = {"text": _content_hash([cfg.general_text]),
           "eval": cfg.model_dump(include={"general_texts", "general_max_tokens", "batch_size"})}
    return _cached(ctx, "base_perplexity", key, lambda: general_perplexity(ctx, Method(), None))


def base_general_knowledge(ctx: RunContext) -> Optional[dict]:
    """`general_knowledge` of the base model (cached on disk)."""
    cfg = ctx.config.eval
    if not cfg.general_tasks:
        return None
    key = {"tasks": [_content_hash([folder]) for folder in cfg.general_tasks], "names": list(cfg.general_tasks),
           "eval": cfg.model_dump(include={"choice_norm", "batch_size"})}
    return _cached(ctx, "base_knowledge", key, lambda: general_knowledge(ctx, Method(), None))


def evaluate_row(ctx: RunContext, method: Method, task_indices: list[int],
                 task_id: str = "oracle") -> tuple[list, dict]:
    """Accuracy on the given tasks, with the task id given (`oracle`) or found by the method's task
    locator (`locate`). With several processes each evaluates a shard of every test set and the counts are
    summed. Returns the row and {"predictions": ..., "locator": {task: located-correctly %}}."""
    cfg = ctx.config.eval
    accelerator = ctx.accelerator
    shard = eval_shard(ctx)
    if task_id == "locate" and not method.has_locator:
        raise EvoloraError(f"eval.task_id: locate needs a method with a task locator; {method.name} has none")
    row: list[Optional[float]] = [None] * len(ctx.tasks)
    predictions = {}
    # correct, total, located correctly, summed ROUGE-L, whether a shard scored ROUGE-L
    counts = torch.zeros(len(ctx.tasks), 5, dtype=torch.float64)
    ctx.model.eval()
    from tqdm.auto import tqdm

    # per task, not per batch: a bar (shown on a terminal only) for evaluations that can take minutes
    tasks_bar = tqdm(task_indices, desc="evaluating", leave=False, disable=None if accelerator.is_main_process else True)
    with accelerator.autocast():
        for j in tasks_bar:
            tasks_bar.set_postfix_str(ctx.tasks[j].name)
            if task_id == "locate":
                result, located = _evaluate_located(ctx, method, j, shard)
            else:
                state = method.answer_state(j) if cfg.cache and ctx.zero_engine is None else None
                key = None if state is None else fingerprint(state)
                cached = ctx.eval_cache.get(j)
                if key is not None and cached is not None and cached[0] == key:
                    result = cached[1]  # nothing that answers this task changed since it was scored
                    ctx.eval_cache_hits += 1
                else:
                    with method.route(j):
                        result = evaluate_task(ctx.model, ctx.tasks[j], j, ctx.prompts, ctx.device, cfg.mode,
                                               cfg.batch_size, cfg.max_new_tokens, shard=shard,
                                               choice_norm=cfg.choice_norm, metric=cfg.metric)
                    if key is not None:
                        ctx.eval_cache[j] = (key, result)
                located = 0
            counts[j] = torch.tensor([result.correct, result.total, located, result.score or 0.0,
                                      result.score is not None], dtype=torch.float64)
            predictions[ctx.tasks[j].name] = result.predictions
    if shard[1] > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    for j in task_indices:
        scored = cfg.metric == "rougeL" and counts[j, 4].item() > 0
        row[j] = 100.0 * counts[j, 3 if scored else 0].item() / counts[j, 1].item()
    locator = {ctx.tasks[j].name: 100.0 * counts[j, 2].item() / counts[j, 1].item() for j in task_indices} \
        if task_id == "locate" else {}
    return row, {"predictions": predictions, "locator": locator}


def _eval_cache_file(ctx: RunContext, run_dir: Path) -> Path:
    rank, world = eval_shard(ctx)  # each process keeps the scores of its own shard of the examples
    return Path(run_dir) / STATE / f"eval-cache-{rank}of{world}.json"


def _eval_cache_scope(ctx: RunContext, shard: bool = True) -> str:
    """Everything but the answering tensors that decides a cached score: the config (model, data, method, train
    and eval settings; not the run's name or output), the shard (`shard`), each task's test examples and
    evolora's version."""
    import hashlib

    from evolora import __version__

    tasks = [[t.name, t.instruction, t.labels, [[e.input, e.output, e.instruction, list(e.choices or [])]
                                                for e in t.test]] for t in ctx.tasks]
    config = ctx.config.model_dump(mode="json", exclude={"name", "output"})
    source = json.dumps({"config": config, "shard": list(eval_shard(ctx)) if shard else None, "tasks": tasks,
                         "version": __version__}, sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()


def save_eval_cache(ctx: RunContext, run_dir: Optional[Path]) -> None:
    """Keeps the eval cache in the run folder after a stage's evaluation, so a resumed run re-scores only what
    changed since (in memory alone, the first evaluation after a resume scores every task again)."""
    if run_dir is None or not ctx.config.eval.cache or not ctx.eval_cache:
        return
    if eval_shard(ctx)[1] == 1 and not ctx.accelerator.is_main_process:
        return  # every process scored every example: the main one keeps them
    path = _eval_cache_file(ctx, run_dir)
    entries = {str(j): [key, {"correct": r.correct, "total": r.total, "predictions": r.predictions, "score": r.score}]
               for j, (key, r) in ctx.eval_cache.items()}
    guarded_write(path, lambda: atomic.write_json(path, {"scope": _eval_cache_scope(ctx), "entries": entries}))


def load_eval_cache(ctx: RunContext, run_dir: Path) -> int:
    """The eval cache a run folder kept, when it was made under the same scope (`_eval_cache_scope`); a missing,
    unreadable or foreign file is ignored (the tasks are scored again). Returns the number of entries loaded."""
    from evolora.evaluation import TaskResult

    path = _eval_cache_file(ctx, run_dir)
    if not ctx.config.eval.cache or not path.is_file():
        return 0
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("scope") != _eval_cache_scope(ctx):
            return 0
        ctx.eval_cache = {int(j): (str(key), TaskResult(int(r["correct"]), int(r["total"]), list(r["predictions"]),
                                                        r["score"]))
                          for j, (key, r) in stored["entries"].items() if 0 <= int(j) < len(ctx.tasks)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0
    return len(ctx.eval_cache)


def save_method_scores(ctx: RunContext, method: Method, run_dir: Optional[Path]) -> None:
    """Keeps the scores the method keeps between stages (`Method.kept_scores`) in the run folder, beside the
    stage's checkpoint; every process computed the same, the main one writes."""
    kept = method.kept_scores() if ctx.config.eval.cache and run_dir is not None else {}
    if kept and ctx.accelerator.is_main_process:
        path = Path(run_dir) / STATE / "method-scores.json"
        guarded_write(path, lambda: atomic.write_json(path, {"scope": _eval_cache_scope(ctx, shard=False), "kept": kept}))


def load_method_scores(ctx: RunContext, method: Method, run_dir: Path) -> bool:
    """Gives the method back the scores a run folder kept, when they were made under the same scope; a missing,
    unreadable or foreign file is ignored (the method computes them again)."""
    path = Path(run_dir) / STATE / "method-scores.json"
    if not ctx.config.eval.cache or not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("scope") != _eval_cache_scope(ctx, shard=False):
            return False
        method.restore_kept_scores(stored["kept"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def evaluate_dev(ctx: RunContext, method: Method) -> dict:
    """The final model on each task's dev split (carved from train, data.dev_per_label), task ids given: the
    figure options are chosen by, kept beside the test figures and never mixed with them."""
    import dataclasses

    tasks, cache = ctx.tasks, ctx.eval_cache
    ctx.tasks = [dataclasses.replace(t, test=list(t.dev)) for t in tasks]
    ctx.eval_cache = {}  # keyed by task: the test split's scores must not answer for the dev split
    try:
        indices = [j for j, t in enumerate(tasks) if t.dev]
        row, _ = evaluate_row(ctx, method, indices)
    finally:
        ctx.tasks, ctx.eval_cache = tasks, cache
    scored = [row[j] for j in indices]
    return {"R_final": row, "AP": sum(scored) / len(scored), "n": {tasks[j].name: len(tasks[j].dev) for j in indices}}


def gather_shards(ctx: RunContext, local: dict[str, list], sizes: dict[str, int]) -> dict[str, list]:
    """Each process holds examples rank::world of every named list (eval_shard): the whole lists, in example
    order, on every process (a collective: every process calls it)."""
    world = eval_shard(ctx)[1]
    parts = [local]
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    whole = {}
    for name, size in sizes.items():
        whole[name] = [None] * size
        for rank, part in enumerate(parts):
            whole[name][rank::world] = part[name]
    return whole


def write_predictions(ctx: RunContext, path: Path, predictions: dict[str, list], label: str) -> None:
    """One JSON line per evaluated test example: `label` (the stage or evaluation it belongs to), task,
    index in the task's test set, input, gold answer, prediction, correct. Each process holds the
    predictions of its shard (examples rank::world); they are gathered and the main process writes."""
    whole = gather_shards(ctx, predictions, {t.name: len(t.test) for t in ctx.tasks if t.name in predictions})
    if not ctx.accelerator.is_main_process:
        return
    lines = []
    for task in ctx.tasks:
        if task.name not in predictions:
            continue
        for index, (example, prediction) in enumerate(zip(task.test, whole[task.name])):
            gold = example.output.strip()
            lines.append(json.dumps({"eval": label, "task": task.name, "index": index, "input": example.input,
                                     "gold": gold, "prediction": prediction, "correct": prediction == gold},
                                    ensure_ascii=False))
    guarded_write(path, lambda: atomic.write_text(path, "".join(line + "\n" for line in lines)))


def evaluate_located_final(ctx: RunContext, method: Method, write_to: Optional[Path] = None) -> dict:
    """The final model on every task with located task ids, and the locator's accuracy for each kind of
    density model it has (they share the cached features). With `write_to`, each example's prediction is
    written there."""
    every = list(range(len(ctx.tasks)))
    row, info = evaluate_row(ctx, method, every, "locate")
    if write_to is not None:
        write_predictions(ctx, write_to, info["predictions"], "final-located")
    sizes = [len(t.test) for t in ctx.tasks]
    by_kind = {}
    shard = eval_shard(ctx)
    for kind in method.locator_kinds:
        hits = torch.zeros(len(ctx.tasks), dtype=torch.long)
        for j in every:
            prompts = [ctx.prompts.encode_prompt(ctx.tasks[j], ex, j).input_ids
                       for ex in ctx.tasks[j].test[shard[0]::shard[1]]]
            hits[j] = sum(x == j for x in method.locate(ctx, ("test", j, shard), prompts, kind))
        if shard[1] > 1:
            hits = ctx.accelerator.reduce(hits.to(ctx.accelerator.device), reduction="sum").cpu()
        by_kind[kind] = 100.0 * hits.sum().item() / sum(sizes)
    overall = sum(info["locator"][t.name] * n for t, n in zip(ctx.tasks, sizes)) / sum(sizes)
    return {"R_final": row, "AP": sum(row) / len(row), "locator": overall, "locator_per_task": info["locator"],
            "locator_kind": method.locator_kind, "locator_by_kind": by_kind}


def _evaluate_located(ctx: RunContext, method: Method, j: int, shard: tuple[int, int]):
    """Task j's test examples, each routed to the task the locator finds for it."""
    import dataclasses

    from evolora.evaluation import TaskResult

    cfg = ctx.config.eval
    task = ctx.tasks[j]
    examples = task.test[shard[0]::shard[1]]
    prompts = [ctx.prompts.encode_prompt(task, ex, j).input_ids for ex in examples]
    located = method.locate(ctx, ("test", j, shard), prompts)
    predictions: list[Optional[str]] = [None] * len(examples)
    correct, score = 0, None
    for t in sorted(set(located)):
        members = [i for i, x in enumerate(located) if x == t]
        subset = dataclasses.replace(task, test=[examples[i] for i in members])
        with method.route(t):
            part = evaluate_task(ctx.model, subset, j, ctx.prompts, ctx.device, cfg.mode, cfg.batch_size,
                                 cfg.max_new_tokens, choice_norm=cfg.choice_norm, metric=cfg.metric)
        correct += part.correct
        if part.score is not None:
            score = (score or 0.0) + part.score
        for i, p in zip(members, part.predictions):
            predictions[i] = p
    return TaskResult(correct, len(examples), predictions, score), sum(x == j for x in located)


def general_perplexity(ctx: RunContext, method: Method, route_task: Optional[int]) -> Optional[float]:
    """Perplexity of the held-out general text (eval.general_text), or None when none is configured. The
    method routes as for `route_task` (general text has no task: the latest task's route is used)."""
    cfg = ctx.config.eval
    if not cfg.general_text:
        return None
    if ctx.general_sequences is None:
        from evolora.data.general import encode_texts, read_texts

        texts = read_texts(cfg.general_text, cfg.general_texts)
        ctx.general_sequences = encode_texts(ctx.tokenizer, texts, cfg.general_max_tokens)
    from evolora.evaluation import perplexity

    accelerator, shard = ctx.accelerator, eval_shard(ctx)
    ctx.model.eval()
    with accelerator.autocast(), method.route(route_task):
        result = perplexity(ctx.model, ctx.general_sequences, ctx.tokenizer.pad_token_id, ctx.device,
                            batch_size=max(1, cfg.batch_size // 2), shard=shard)
    if shard[1] > 1:
        totals = torch.tensor([result.nll_sum, float(result.tokens)], dtype=torch.float64)
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        result.nll_sum, result.tokens = totals[0].item(), int(totals[1].item())
    return result.value


def general_knowledge(ctx: RunContext, method: Method, route_task: Optional[int]) -> Optional[dict]:
    """Accuracy on the multiple-choice general-knowledge tasks (eval.general_tasks), never trained on, routed as
    `general_perplexity` routes: {task: {acc, acc_norm, n}}, `mean` (by eval.choice_norm), and `correct`: each
    question's correctness by that normalisation ("0"/"1" per question, in the task's order; for paired
    intervals between runs), or None."""
    cfg = ctx.config.eval
    if not cfg.general_tasks:
        return None
    if ctx.knowledge_tasks is None:
        from evolora.data.readers import read_choice_task

        ctx.knowledge_tasks = [read_choice_task(Path(folder)) for folder in cfg.general_tasks]
    from evolora.evaluation import evaluate_choices

    accelerator, shard = ctx.accelerator, eval_shard(ctx)
    ctx.model.eval()
    out: dict[str, Any] = {"tasks": {}, "correct": {}}
    with accelerator.autocast(), method.route(route_task):
        for task in ctx.knowledge_tasks:
            r = evaluate_choices(ctx.model, task, -1, ctx.prompts, ctx.device, cfg.batch_size, cfg.choice_norm,
                                 plain=True, shard=shard)
            hits = ["1" if p == ex.output else "0" for p, ex in zip(r.predictions, task.test[shard[0]::shard[1]])]
            out["correct"][task.name] = "".join(gather_shards(ctx, {task.name: hits}, {task.name: len(task.test)})[task.name])
            counts = torch.tensor([r.correct, r.correct_norm, r.total], dtype=torch.float64)
            if shard[1] > 1:
                counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
            correct, correct_norm, total = counts.tolist()
            out["tasks"][task.name] = {"acc": 100.0 * correct / total, "acc_norm": 100.0 * correct_norm / total,
                                       "n": int(total)}
    key = "acc_norm" if cfg.choice_norm == "tokens" else "acc"
    out["mean"] = sum(t[key] for t in out["tasks"].values()) / len(out["tasks"])
    return out
