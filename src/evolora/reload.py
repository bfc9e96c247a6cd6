"""Rebuild a finished run's model from its folder: config, structure (replaying `grow`), final tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from evolora import atomic
from evolora.data.tasks import Example
from evolora.config import load_config
from evolora.engine import (build_context, checkpoint_path, evaluate_located_final, evaluate_row, general_knowledge,
                            load_checkpoint, write_predictions)
from evolora.errors import EvoloraError
from evolora.models import bf16_products
from evolora.report import predictions_path
from evolora.engine.state import read_progress


def trusted(overrides: list[str] = (), trust_remote_code: bool = False, allow_pickle: bool = False) -> list[str]:
    """A received run folder's config.yaml never turns on code execution: remote model code and pickle weights
    are off unless the caller turns them on (its flags, or its own overrides, which come after)."""
    return [f"model.trust_remote_code={str(trust_remote_code).lower()}",
            f"model.allow_pickle={str(allow_pickle).lower()}", *overrides]


def load_run(run_dir: Path, overrides: list[str] = (), trust_remote_code: bool = False, allow_pickle: bool = False,
             stage: Optional[int] = None):
    """The finished run's model (run_dir's config with `overrides`; remote code and pickle weights only as the
    arguments say, never as the folder's config.yaml says). Overrides of `method.options.*` reach the method's
    `reload_skip` and `refit` hooks (a task locator refitted with new locator options, moe_cl's answering experts
    chosen anew with new reassignment options). `stage` (0-based) loads the model as it was after that stage, when
    its checkpoint was kept (`output.keep_checkpoints: all`)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml", trusted(overrides, trust_remote_code, allow_pickle))
    ctx, method = build_context(config, run_dir, log=lambda _: None)
    progress = read_progress(run_dir) or {}
    if len(progress.get("R", [])) != len(ctx.stages):
        raise EvoloraError(f"{run_dir}: the run has not finished (resume it with evolora run --resume)")
    changed = {key[len("method.options."):] for key in (o.split("=", 1)[0].strip() for o in overrides)
               if key.startswith("method.options.")}
    last = len(ctx.stages) - 1 if stage is None else stage
    if not 0 <= last < len(ctx.stages):
        raise EvoloraError(f"--stage: {last + 1} is not a stage of this run (1..{len(ctx.stages)})")
    path = checkpoint_path(run_dir, last)
    if not path.is_file():
        raise EvoloraError(f"{path}: stage {last + 1}'s checkpoint was not kept (output.keep_checkpoints: all keeps "
                           "every stage's)")
    for grown in range(last + 1):
        method.grow(grown, ctx)
    load_checkpoint(ctx, method, path, progress.get("checkpoints", {}).get(path.name),
                    skip_module=method.reload_skip(changed))
    method.refit(ctx, changed)
    ctx.model.eval()
    return ctx, method


def run_precision(run_dir: Path, overrides: list[str] = ()):
    """The run's model config decides whether bf16 products run in fp32 (models.bf16_products)."""
    return bf16_products(load_config(Path(run_dir) / "config.yaml", overrides).model)


def evaluate_run(run_dir: Path, overrides: list[str] = (), trust_remote_code: bool = False,
                 allow_pickle: bool = False, knowledge: bool = False) -> dict:
    """The final model on every task of the stream (eval.json); with `knowledge`, also on the run's
    general-knowledge probe (eval.general_tasks), routed as the run routed it after its last stage, with each
    question's correctness."""
    with run_precision(run_dir, overrides):
        return _evaluate_run(run_dir, overrides, trust_remote_code, allow_pickle, knowledge)


def _evaluate_run(run_dir: Path, overrides: list[str], trust_remote_code: bool, allow_pickle: bool,
                  knowledge: bool) -> dict:
    ctx, method = load_run(run_dir, overrides, trust_remote_code, allow_pickle)
    known = _final_knowledge(ctx, method, run_dir) if knowledge else None  # first: a run without a probe fails fast
    label = f"eval-{ctx.config.eval.task_id}"
    path = predictions_path(run_dir, label) if ctx.config.eval.save_predictions else None
    if ctx.config.eval.task_id == "locate":
        located = evaluate_located_final(ctx, method, path)
        row = located["R_final"]
        extra = {"locator": located["locator"], "locator_per_task": located["locator_per_task"],
                 "locator_by_kind": located["locator_by_kind"]}
    else:
        row, info = evaluate_row(ctx, method, list(range(len(ctx.tasks))), "oracle")
        if path is not None:
            write_predictions(ctx, path, info["predictions"], label)
        extra = {}
    extra.update(method.eval_record())
    if known is not None:
        extra["knowledge"] = known
    result = {"accuracy": {t.name: a for t, a in zip(ctx.tasks, row)}, "mean": sum(row) / len(row),
              "mode": ctx.config.eval.mode, "task_id": ctx.config.eval.task_id, "overrides": list(overrides),
              **extra}
    atomic.write_json(Path(run_dir) / "eval.json", result)
    return result


def run_knowledge(run_dir: Path) -> dict:
    """The finished run's final model on its general-knowledge probe only (eval.general_tasks), routed as the run
    routed it after its last stage, with each question's correctness; its tasks are not evaluated again."""
    with run_precision(run_dir):
        ctx, method = load_run(run_dir)
        return _final_knowledge(ctx, method, run_dir)


def _final_knowledge(ctx, method, run_dir: Path) -> dict:
    if not ctx.config.eval.general_tasks:
        raise EvoloraError(f"--knowledge: {run_dir}'s config has no eval.general_tasks to measure")
    return general_knowledge(ctx, method, max(ctx.stages[-1]))


def read_inputs(path: Path) -> list[Example]:
    """Inputs to predict: JSONL rows with `input` (and optionally `instruction`), or plain text lines."""
    from evolora.data.readers import _read_text, _string_field, iter_jsonl
    from evolora.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix != ".jsonl":
        lines = _read_text(path).splitlines()
        return [Example(line.strip(), "") for line in lines if line.strip()]
    rows = []
    for line, row in iter_jsonl(path):
        text = _string_field(path, line, row, "input")
        rows.append(Example(text, "", _string_field(path, line, row, "instruction", required=False)))
    if not rows:
        raise DataError(f"{path}: no inputs")
    return rows


@torch.no_grad()
def predict(run_dir: Path, examples: list[Example], task: Optional[str] = None, trust_remote_code: bool = False,
            allow_pickle: bool = False) -> list[dict]:
    """Answers for new inputs. With `task` the named task's experts answer (oracle); without, the run's
    task locator picks the task: every input is framed as each task would frame it (its instruction
    unless the input brings one, its answer options), scored by that task's density model, and the task
    with the lowest z-score answers."""
    with run_precision(run_dir):
        return _predict(run_dir, examples, task, trust_remote_code, allow_pickle)


def _predict(run_dir: Path, examples: list[Example], task: Optional[str], trust_remote_code: bool,
             allow_pickle: bool) -> list[dict]:
    from evolora.data.tasks import Task
    from evolora.evaluation import evaluate_task

    ctx, method = load_run(run_dir, (), trust_remote_code, allow_pickle)
    names = [t.name for t in ctx.tasks]
    if task is not None:
        if task not in names:
            raise EvoloraError(f"--task: {task!r} is not a task of this run ({', '.join(names)})")
        located = [names.index(task)] * len(examples)
    else:
        if not method.has_locator:
            raise EvoloraError(f"{method.name} has no task locator: name the task with --task ({', '.join(names)})")
        located = method.locate_new(ctx, examples)
    out: list[dict] = [{} for _ in examples]
    cfg = ctx.config.eval
    with ctx.accelerator.autocast():
        for t in sorted(set(located)):
            members = [i for i, x in enumerate(located) if x == t]
            subset = Task(ctx.tasks[t].name, ctx.tasks[t].instruction, ctx.tasks[t].labels, [],
                          [examples[i] for i in members])
            with method.route(t):
                result = evaluate_task(ctx.model, subset, t, ctx.prompts, ctx.device, cfg.mode, cfg.batch_size,
                                       cfg.max_new_tokens, choice_norm=cfg.choice_norm)
            for i, answer in zip(members, result.predictions):
                out[i] = {"input": examples[i].input, "task": names[t], "answer": answer}
    return out
