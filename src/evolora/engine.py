"""The run, top to bottom: load the stream and the model, let the method shape the model, evaluate
zero-shot, then for each stage: grow -> before_task -> train -> after_task -> checkpoint -> evaluate.
The loop calls the method's hooks and never names a method."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from evolora import atomic
from evolora.config import RunConfig, dump_config
from evolora.data import Task, build_stream
from evolora.data.batching import collate_train, length_grouped_batches
from evolora.data.prompting import Encoded, PromptBuilder
from evolora.errors import EvoloraError
from evolora.evaluation import evaluate_task
from evolora.methods import Method, StepInputs, build_method, validate_method_options
from evolora.metrics import compute_metrics
from evolora.models import answer_loss, bf16_emulation_note, bf16_products, load_model
from evolora.report import predictions_path
from evolora import runfolder
from evolora.runfolder import RunLock
from evolora.state import (clear_step_state, guarded_write, load_tensors, read_progress, read_step_state,
                           restore_step_state, save_step_state, save_tensors, write_progress)


@dataclass
class RunContext:
    config: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    prompts: PromptBuilder
    tasks: list[Task]
    device: torch.device
    accelerator: Any
    run_dir: Optional[Path]
    stages: list[list[int]] = field(default_factory=list)
    log: Callable[[str], None] = print
    general_sequences: Optional[list[list[int]]] = None
    """Token ids of the held-out general text, read on first use."""
    knowledge_tasks: Optional[list[Task]] = None
    """The general-knowledge probe's tasks (eval.general_tasks), read on first use."""

    def encode_train(self, task_index: int) -> list[Encoded]:
        task = self.tasks[task_index]
        return [self.prompts.encode_train(task, ex, task_index) for ex in task.train]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(config: RunConfig, model: torch.nn.Module) -> str:
    choice = config.train.mixed_precision
    if choice != "auto":
        return choice
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(config: RunConfig, model, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed_precision = autocast_dtype(config, model)
    # accelerate keeps one state per process and refuses another device or precision later on; a second
    # run in the same process (a notebook, a sweep, the test suite) may need one. A single process's state
    # can be rebuilt; a distributed launch's cannot, and all its runs share one device anyway.
    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.num_processes == 1 and (state.device.type != device.type or state.mixed_precision != mixed_precision):
            AcceleratorState._reset_state(True)
    # Gradient accumulation is done in the loop (explicit sync steps), not by accelerate's counter.
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def build_context(config: RunConfig, run_dir: Optional[Path], log=print,
                  before_setup: Optional[Callable[["RunContext"], None]] = None) -> tuple[RunContext, Method]:
    """Stream, model, method and accelerator, with the method's setup applied. `before_setup` sees the
    bare base model (the zero-shot evaluation runs there)."""
    seed_everything(config.train.seed)
    tasks = build_stream(config.data)
    model, tokenizer, device = load_model(config.model)
    if note := bf16_emulation_note(next(model.parameters()).dtype, device):
        log(note)
    method = build_method(config.method)
    method.base_parameter_ids = {id(p) for p in model.parameters()}
    accelerator = make_accelerator(config, model, device)
    prompts = PromptBuilder(tokenizer, config.data.max_input_tokens, config.model.chat_template)
    ctx = RunContext(config, model, tokenizer, prompts, tasks, device, accelerator, run_dir, log=log)
    if before_setup:
        before_setup(ctx)
    seed_everything(config.train.seed)
    ctx.model = method.setup(model, ctx)
    ctx.stages = method.stages(len(tasks))
    return ctx, method


def count_parameters(model: torch.nn.Module, method: Method) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(p.numel() for p in model.parameters() if id(p) not in method.base_parameter_ids)
    base = sum(p.numel() for p in model.parameters() if id(p) in method.base_parameter_ids)
    return {"trainable": trainable, "added": added, "base": base}


# --- training ----------------------------------------------------------------------------------------

class StepLog:
    def __init__(self, run_dir: Optional[Path], tensorboard: bool):
        self.path = run_dir / runfolder.STEPS if run_dir else None
        self.writer = None
        if run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / runfolder.TENSORBOARD))
            except ImportError:
                pass

    def write(self, record: dict, global_step: int) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("stage", "step"):
                    self.writer.add_scalar(f"train/{key}", value, global_step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class Interrupted(EvoloraError):
    """Ctrl-C during training: the step state was saved and the run can be resumed."""


def train_stage(ctx: RunContext, method: Method, stage: int, examples: list[Encoded], step_log: StepLog,
                global_step: int, resume: Optional[dict] = None) -> dict:
    """Trains one stage. `resume` is a saved step state of this stage: training continues after it."""
    cfg = ctx.config.train
    model, accelerator = ctx.model, ctx.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EvoloraError(f"method {method.name}: nothing to train at stage {stage}")
    for p in params:  # master weights in fp32; autocast runs the matmuls in the model's dtype
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    from transformers import get_scheduler

    rank, world = accelerator.process_index, accelerator.num_processes
    batches: list[list[Encoded]] = []
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_batches = max(1, round(batches_per_epoch * cfg.epochs))
    epoch = 0
    while len(batches) < total_batches:
        batches.extend(length_grouped_batches(examples, cfg.batch_size, seed=cfg.seed * 1000 + stage * 97 + epoch))
        epoch += 1
    batches = batches[:total_batches]
    if world > 1:  # every rank takes its share; equal counts keep the collectives in step
        per_rank = max(1, len(batches) // world)
        batches = batches[rank::world][:per_rank]
    total_updates = math.ceil(len(batches) / cfg.grad_accum)

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_updates),
                              num_training_steps=total_updates)
    # One process: the model is used as is, under autocast. Several: model and optimizer are prepared
    # together (DDP, FSDP or DeepSpeed, as `accelerate launch` configured) at every stage, since methods
    # may have added parameters since the last one.
    if world > 1:
        train_model, optimizer = accelerator.prepare(model, optimizer)
    else:
        train_model, optimizer = model, accelerator.prepare_optimizer(optimizer)
    first_step = 0
    if resume is not None:
        restore_step_state(ctx.run_dir, resume, model, optimizer, scheduler)
        first_step = resume["step"] + 1
    pad_id = ctx.tokenizer.pad_token_id
    names = ", ".join(ctx.tasks[i].name for i in ctx.stages[stage])
    every = cfg.checkpoint_every
    is_main = accelerator.is_main_process

    def save_state(step: int) -> None:
        if is_main and ctx.run_dir is not None:
            save_step_state(ctx.run_dir, stage, step, model, optimizer, scheduler, {"global_step": global_step + step})

    from tqdm.auto import tqdm

    train_model.train()
    tokens, started, running, last_synced = 0, time.perf_counter(), None, first_step - 1
    bar = tqdm(total=len(batches), initial=first_step, desc=f"stage {stage + 1}/{len(ctx.stages)} [{names}]",
               leave=False, disable=None if is_main else True)
    try:
        for step in range(first_step, len(batches)):
            host_batch = collate_train(batches[step], pad_id)
            batch = host_batch.to(ctx.device)
            sync = (step + 1) % cfg.grad_accum == 0 or step == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(train_model):
                with accelerator.autocast():
                    with method.batch_route(host_batch.task_ids):  # routing reads the ids without waiting on the GPU
                        outputs = train_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                              position_ids=batch.position_ids,
                                              logits_to_keep=batch.labels.shape[1] + 1,
                                              output_hidden_states=method.needs_hidden_states)
                    task_loss = answer_loss(outputs.logits, batch.labels)
                    terms = method.loss_terms(StepInputs(batch, outputs, task_loss, stage, train_model), ctx)
                    loss = task_loss + sum(terms.values()) if terms else task_loss
                if not torch.isfinite(loss):
                    raise EvoloraError(f"loss is {loss.item()} at stage {stage + 1} ({names}), step {step}: stopped; "
                                       "the last good checkpoint is kept (lower train.lr or check the data)")
                accelerator.backward(loss / cfg.grad_accum)
            if sync:
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                last_synced = step
            tokens += batch.n_tokens
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            if is_main and (step % cfg.log_every == 0 or step == len(batches) - 1):
                record = {"stage": stage, "step": step, "loss": value, "task_loss": task_loss.item(),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed}
                record.update({k: v.item() for k, v in terms.items()})
                step_log.write(record, global_step + step)
            if every and sync and (step + 1) % every == 0 and step < len(batches) - 1:
                save_state(step)
    except KeyboardInterrupt:
        bar.close()
        if last_synced >= first_step:
            save_state(last_synced)
            raise Interrupted(f"interrupted at stage {stage + 1} ({names}), step {last_synced}: state saved in "
                              f"{ctx.run_dir}; continue with --resume {ctx.run_dir}") from None
        raise Interrupted(f"interrupted at stage {stage + 1} ({names}); continue with --resume {ctx.run_dir}") \
            from None
    bar.close()
    model.eval()
    ctx.model = model
    del train_model
    accelerator.free_memory()
    seconds = time.perf_counter() - started
    return {"steps": len(batches), "updates": total_updates, "tokens": tokens * world, "seconds": seconds,
            "tokens_per_s": tokens * world / seconds if seconds else 0.0, "final_loss": running,
            **({"resumed_at_step": first_step} if first_step else {})}


# --- evaluation --------------------------------------------------------------------------------------

def tasks_to_evaluate(policy: str, seen_upto: int, num_tasks: int) -> list[int]:
    """Seen tasks, plus the future tasks the policy asks for (`next` is enough for FWT)."""
    last = {"all": num_tasks - 1, "next": min(seen_upto + 1, num_tasks - 1), "none": seen_upto}[policy]
    return list(range(0, last + 1))


def zero_shot_row(ctx: RunContext) -> list[Optional[float]]:
    """Accuracy of the base model on every task, before any method touches it. Cached on disk by
    everything it depends on, so the runs of a suite share it."""
    import hashlib

    from evolora import __version__
    from evolora.models import cache_dir

    probe = [ctx.prompts.encode_prompt(t, t.test[0], i).input_ids + ctx.prompts.answer_ids(t.test[0].output)
             for i, t in enumerate(ctx.tasks)]  # catches prompt-format, tokenizer and data changes
    probe_hash = hashlib.sha256(json.dumps([probe, [len(t.test) for t in ctx.tasks]]).encode()).hexdigest()
    key_source = json.dumps({"model": ctx.config.model.model_dump(), "data": ctx.config.data.model_dump(),
                             "probe": probe_hash,
                             "eval": ctx.config.eval.model_dump(exclude={"future_tasks", "zero_shot", "general_text",
                                                                         "general_texts", "general_max_tokens",
                                                                         "task_id", "locate_final"}),
                             "autocast": autocast_dtype(ctx.config, ctx.model), "version": __version__},
                            sort_keys=True)
    path = cache_dir() / "zero_shot" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:20]}.json"
    row = None
    if ctx.accelerator.is_main_process and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            row = cached["row"] if cached.get("key") == key_source else None
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            row = None
    if ctx.accelerator.num_processes > 1:  # every rank must take the same branch
        from accelerate.utils import broadcast_object_list

        row = broadcast_object_list([row])[0]
    if row is None:
        row, _ = evaluate_row(ctx, Method(), list(range(len(ctx.tasks))))
        if ctx.accelerator.is_main_process:
            atomic.write_json(path, {"key": key_source, "row": row})
    return row


def evaluate_row(ctx: RunContext, method: Method, task_indices: list[int],
                 task_id: str = "oracle") -> tuple[list, dict]:
    """Accuracy on the given tasks, with the task id given (`oracle`) or found by the method's task
    locator (`locate`). With several processes each evaluates a shard of every test set and the counts are
    summed. Returns the row and {"predictions": ..., "locator": {task: located-correctly %}}."""
    cfg = ctx.config.eval
    accelerator = ctx.accelerator
    shard = (accelerator.process_index, accelerator.num_processes)
    if task_id == "locate" and not getattr(method, "has_locator", False):
        raise EvoloraError(f"eval.task_id: locate needs a method with a task locator; {method.name} has none")
    row: list[Optional[float]] = [None] * len(ctx.tasks)
    predictions = {}
    counts = torch.zeros(len(ctx.tasks), 3, dtype=torch.long)  # correct, total, located correctly
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
                with method.route(j):
                    result = evaluate_task(ctx.model, ctx.tasks[j], j, ctx.prompts, ctx.device, cfg.mode,
                                           cfg.batch_size, cfg.max_new_tokens, shard=shard,
                                           choice_norm=cfg.choice_norm)
                located = 0
            counts[j] = torch.tensor([result.correct, result.total, located])
            predictions[ctx.tasks[j].name] = result.predictions
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    for j in task_indices:
        row[j] = 100.0 * counts[j, 0].item() / counts[j, 1].item()
    locator = {ctx.tasks[j].name: 100.0 * counts[j, 2].item() / counts[j, 1].item() for j in task_indices} \
        if task_id == "locate" else {}
    return row, {"predictions": predictions, "locator": locator}


def write_predictions(ctx: RunContext, path: Path, predictions: dict[str, list], label: str) -> None:
    """One JSON line per evaluated test example: `label` (the stage or evaluation it belongs to), task,
    index in the task's test set, input, gold answer, prediction, correct. Each process holds the
    predictions of its shard (examples rank::world); they are gathered and the main process writes."""
    world = ctx.accelerator.num_processes
    parts = [predictions]
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([predictions])
    if not ctx.accelerator.is_main_process:
        return
    lines = []
    for task in ctx.tasks:
        if task.name not in predictions:
            continue
        merged: list = [None] * len(task.test)
        for rank, part in enumerate(parts):
            merged[rank::world] = part[task.name]
        for index, (example, prediction) in enumerate(zip(task.test, merged)):
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
    shard = (ctx.accelerator.process_index, ctx.accelerator.num_processes)
    for kind in ("gaussian", "vae"):
        hits = torch.zeros(len(ctx.tasks), dtype=torch.long)
        for j in every:
            prompts = [ctx.prompts.encode_prompt(ctx.tasks[j], ex, j).input_ids
                       for ex in ctx.tasks[j].test[shard[0]::shard[1]]]
            hits[j] = sum(x == j for x in method.locate(ctx, ("test", j, shard), prompts, kind))
        if ctx.accelerator.num_processes > 1:
            hits = ctx.accelerator.reduce(hits.to(ctx.accelerator.device), reduction="sum").cpu()
        by_kind[kind] = 100.0 * hits.sum().item() / sum(sizes)
    overall = sum(info["locator"][t.name] * n for t, n in zip(ctx.tasks, sizes)) / sum(sizes)
    return {"R_final": row, "AP": sum(row) / len(row), "locator": overall, "locator_per_task": info["locator"],
            "locator_kind": method.options.locator, "locator_by_kind": by_kind}


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
    correct = 0
    for t in sorted(set(located)):
        members = [i for i, x in enumerate(located) if x == t]
        subset = dataclasses.replace(task, test=[examples[i] for i in members])
        with method.route(t):
            part = evaluate_task(ctx.model, subset, j, ctx.prompts, ctx.device, cfg.mode, cfg.batch_size,
                                 cfg.max_new_tokens, choice_norm=cfg.choice_norm)
        correct += part.correct
        for i, p in zip(members, part.predictions):
            predictions[i] = p
    return TaskResult(correct, len(examples), predictions), sum(x == j for x in located)


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

    accelerator = ctx.accelerator
    ctx.model.eval()
    with accelerator.autocast(), method.route(route_task):
        result = perplexity(ctx.model, ctx.general_sequences, ctx.tokenizer.pad_token_id, ctx.device,
                            batch_size=max(1, cfg.batch_size // 2),
                            shard=(accelerator.process_index, accelerator.num_processes))
    if accelerator.num_processes > 1:
        totals = torch.tensor([result.nll_sum, float(result.tokens)], dtype=torch.float64)
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        result.nll_sum, result.tokens = totals[0].item(), int(totals[1].item())
    return result.value


def general_knowledge(ctx: RunContext, method: Method, route_task: Optional[int]) -> Optional[dict]:
    """Accuracy on the multiple-choice general-knowledge tasks (eval.general_tasks), never trained on, routed as
    `general_perplexity` routes: {task: {acc, acc_norm, n}} and `mean` (by eval.choice_norm), or None."""
    cfg = ctx.config.eval
    if not cfg.general_tasks:
        return None
    if ctx.knowledge_tasks is None:
        from evolora.data.readers import read_choice_task

        ctx.knowledge_tasks = [read_choice_task(Path(folder)) for folder in cfg.general_tasks]
    from evolora.evaluation import evaluate_choices

    accelerator = ctx.accelerator
    ctx.model.eval()
    out: dict[str, Any] = {"tasks": {}}
    with accelerator.autocast(), method.route(route_task):
        for task in ctx.knowledge_tasks:
            r = evaluate_choices(ctx.model, task, -1, ctx.prompts, ctx.device, cfg.batch_size, cfg.choice_norm,
                                 plain=True, shard=(accelerator.process_index, accelerator.num_processes))
            counts = torch.tensor([r.correct, r.correct_norm, r.total], dtype=torch.float64)
            if accelerator.num_processes > 1:
                counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
            correct, correct_norm, total = counts.tolist()
            out["tasks"][task.name] = {"acc": 100.0 * correct / total, "acc_norm": 100.0 * correct_norm / total,
                                       "n": int(total)}
    key = "acc_norm" if cfg.choice_norm == "tokens" else "acc"
    out["mean"] = sum(t[key] for t in out["tasks"].values()) / len(out["tasks"])
    return out


# --- checkpoints -------------------------------------------------------------------------------------

def checkpoint_path(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / runfolder.CHECKPOINTS / f"stage-{stage + 1:02d}.safetensors"


def save_checkpoint(ctx: RunContext, method: Method, stage: int) -> str:
    """Writes the stage's checkpoint (main process only); returns its sha256."""
    path = checkpoint_path(ctx.run_dir, stage)
    names = [ctx.tasks[i].name for i in ctx.stages[stage]]
    digest = save_tensors(path, method.checkpoint_state(ctx.model),
                          {"stage": str(stage), "tasks": ",".join(names), "method": method.name})
    return digest


def drop_superseded_checkpoint(ctx: RunContext, stage: int) -> None:
    """With keep_checkpoints=last, removes the previous stage's checkpoint — called only once progress.json
    names the new one, so a crash in between always leaves a checkpoint that progress.json can resume from."""
    if ctx.config.output.keep_checkpoints == "last" and stage > 0:
        checkpoint_path(ctx.run_dir, stage - 1).unlink(missing_ok=True)


def load_checkpoint(ctx: RunContext, method: Method, path: Path, sha256: Optional[str] = None,
                    skip_module: Optional[str] = None) -> None:
    """Loads a stage's tensors into the model; those under `skip_module` (a top-level module name) stay as
    they are."""
    state = load_tensors(path, sha256)
    if skip_module:
        state = {k: v for k, v in state.items() if not k.startswith(skip_module + ".")}
    try:
        method.load_checkpoint_state(ctx.model, state)
    except (KeyError, RuntimeError) as exc:  # other tensors, or other shapes (a config edited after the run)
        raise EvoloraError(f"{path}: does not match the model of this run's config ({exc.args[0]})") from None


# --- the run -----------------------------------------------------------------------------------------

def check_resume_config(config: RunConfig, run_dir: Path) -> None:
    from evolora.config import load_config

    saved = load_config(run_dir / runfolder.CONFIG)

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: obj}

    ignore = {"output.dir", "output.overwrite"}
    mine, theirs = flat(config.model_dump(mode="json")), flat(saved.model_dump(mode="json"))
    for key in sorted(set(mine) | set(theirs)):
        if key not in ignore and mine.get(key) != theirs.get(key):
            raise EvoloraError(f"--resume: {key} is {mine.get(key)!r} here but {theirs.get(key)!r} in "
                               f"{run_dir / 'config.yaml'}; a run resumes with the config it started with")


def check_gpus_per_node(config: RunConfig) -> None:
    """Each process of a launch on GPUs takes its own GPU; more processes per node than GPUs would fail
    deep inside CUDA."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > 1 and config.model.device != "cpu" and torch.cuda.is_available() \
            and per_node > torch.cuda.device_count():
        raise EvoloraError(f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s): launch at most "
                           f"{torch.cuda.device_count()} (--nproc_per_node / --num_processes), or set model.device: cpu")


def run(config: RunConfig, run_dir: Optional[Path] = None, log: Callable[[str], None] = print,
        resume: bool = False) -> dict:
    """A whole continual run. With `resume`, continues the run folder from its last completed stage or
    its last step state."""
    from accelerate import PartialState

    check_gpus_per_node(config)
    validate_method_options(config.method)  # before anything is read or written
    # On CPU, accelerate only recognises a torchrun/MPI launch as distributed when told it is on CPU.
    dist = PartialState(cpu=config.model.device == "cpu" or not torch.cuda.is_available())
    is_main = dist.is_main_process
    say = log if is_main else (lambda _: None)
    run_dir = Path(run_dir) if run_dir else config.run_dir()
    if resume and not (run_dir / runfolder.CONFIG).is_file():
        raise EvoloraError(f"{run_dir}: nothing to resume (no {runfolder.CONFIG})")
    created = not run_dir.exists()
    if is_main:
        if not resume:
            runfolder.check_replaceable(run_dir, config.output.overwrite)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvoloraError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    try:
        return _run_in_folder(config, run_dir, say, resume, is_main, dist)
    except BaseException:
        if is_main and created and not runfolder.is_marked(run_dir):  # failed before it began: leave no trace
            (run_dir / runfolder.LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _run_in_folder(config: RunConfig, run_dir: Path, say, resume: bool, is_main: bool, dist) -> dict:
    dist.wait_for_everyone()
    with RunLock(run_dir) if is_main else contextlib.nullcontext():
        if resume:
            check_resume_config(config, run_dir)
            progress = read_progress(run_dir) or {}
        else:
            if is_main:  # again under the lock; the folder is cleared only once the stream and model have loaded
                runfolder.check_replaceable(run_dir, config.output.overwrite)
            progress = {}
        dist.wait_for_everyone()
        with bf16_products(config.model):
            return _run_locked(config, run_dir, say, progress, is_main, fresh=not resume)


def _start_fresh(config: RunConfig, run_dir: Path) -> None:
    """A new run's folder: what an earlier run wrote there goes (the folder was checked to hold only that),
    then the marker and the config. Called once the stream, model and method have been built."""
    runfolder.clear(run_dir)
    runfolder.mark(run_dir, config.name)
    path = run_dir / runfolder.CONFIG
    guarded_write(path, lambda: atomic.write_text(path, dump_config(config)))


def _run_locked(config: RunConfig, run_dir: Path, log, progress: dict, is_main: bool, fresh: bool = False) -> dict:
    started = time.perf_counter()
    timings: dict[str, Any] = dict(progress.get("timings", {}))
    zero_shot = progress.get("zero_shot")
    general_ppl: list[float] = list(progress.get("general_ppl", []))
    knowledge: list[dict] = list(progress.get("knowledge", []))
    locate_record: Optional[dict] = progress.get("locate")

    def evaluate_zero_shot(ctx: RunContext) -> None:
        nonlocal zero_shot
        names = [t.name for t in ctx.tasks]
        log(f"{config.method.name} on {len(names)} tasks: {' -> '.join(names)} ({sum(len(t.train) for t in ctx.tasks)}"
            f" train / {sum(len(t.test) for t in ctx.tasks)} test examples)")
        if config.eval.zero_shot and zero_shot is None:
            t0 = time.perf_counter()
            zero_shot = zero_shot_row(ctx)
            timings["zero_shot_eval_s"] = time.perf_counter() - t0
        if zero_shot is not None:
            log("zero-shot: " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, zero_shot)))
        if config.eval.general_text and not general_ppl:
            general_ppl.append(general_perplexity(ctx, Method(), None))
        if general_ppl:
            log(f"general-text perplexity of the base model: {general_ppl[0]:.2f}")
        if config.eval.general_tasks and not knowledge:
            knowledge.append(general_knowledge(ctx, Method(), None))
        if knowledge:
            log(f"general knowledge of the base model: {knowledge[0]['mean']:.1f} % ({config.eval.choice_norm} norm)")

    ctx, method = build_context(config, run_dir, log, before_setup=evaluate_zero_shot)
    if fresh:
        if is_main:
            _start_fresh(config, run_dir)
        ctx.accelerator.wait_for_everyone()
    names = [t.name for t in ctx.tasks]
    R: list[list[Optional[float]]] = list(progress.get("R", []))
    stage_records: list[dict] = list(progress.get("stages", []))
    checksums: dict[str, str] = dict(progress.get("checkpoints", {}))
    global_step = progress.get("global_step", 0)
    completed = len(R)
    previous_s = timings.get("total_s", 0.0)

    # A stage whose training finished and whose checkpoint was saved, but whose evaluation did not: resume
    # loads that checkpoint and redoes only the evaluation.
    trained: Optional[dict] = progress.get("trained")
    if trained is not None and (trained["stage"] != completed
                                or not checkpoint_path(run_dir, completed).is_file()):
        trained = None
    loaded = completed + (trained is not None)
    if loaded:  # rebuild the structure of the finished stages, then load the last one's tensors
        for stage in range(loaded):
            method.grow(stage, ctx)
        path = checkpoint_path(run_dir, loaded - 1)
        load_checkpoint(ctx, method, path, checksums.get(path.name))
        log(f"resumed after stage {completed}/{len(ctx.stages)}"
            + (f"; stage {loaded} was trained and is evaluated now" if trained else ""))
    step_state = read_step_state(run_dir)
    step_log = StepLog(run_dir if is_main else None, config.output.tensorboard)
    if step_log.path and step_log.path.is_file():
        _trim_step_log(step_log.path, loaded, step_state)

    def save_progress(complete: bool) -> dict:
        timings["total_s"] = previous_s + time.perf_counter() - started
        record = _metrics_record(config, method, ctx, names, R, zero_shot, stage_records, timings, complete,
                                 general_ppl, knowledge)
        record["locate"] = locate_record
        if is_main:
            write_progress(run_dir, {"zero_shot": zero_shot, "general_ppl": general_ppl, "knowledge": knowledge,
                                     "locate": locate_record,
                                     "R": R, "stages": stage_records, "trained": trained,
                                     "checkpoints": checksums, "global_step": global_step, "timings": timings})
            guarded_write(run_dir / runfolder.METRICS, lambda: atomic.write_json(run_dir / runfolder.METRICS, record))
        return record

    continual = all(len(s) == 1 for s in ctx.stages)
    for stage in range(completed, len(ctx.stages)):
        task_indices = ctx.stages[stage]
        if trained is not None and trained["stage"] == stage:
            train_stats = trained["train"]
        else:
            method.grow(stage, ctx)
            method.before_task(stage, ctx)
            examples = [enc for i in task_indices for enc in ctx.encode_train(i)]
            examples = method.training_examples(stage, examples, ctx)
            resume_from = step_state if step_state and step_state["stage"] == stage else None
            if resume_from:
                log(f"resuming stage {stage + 1} after step {resume_from['step']}")
            train_stats = train_stage(ctx, method, stage, examples, step_log, global_step, resume_from)
            global_step += train_stats["steps"]
            method.after_task(stage, ctx)
            figures = method.stage_metrics(stage)
            if figures:
                train_stats["method"] = figures
            if is_main:
                path = checkpoint_path(run_dir, stage)
                checksums[path.name] = save_checkpoint(ctx, method, stage)
            trained = {"stage": stage, "train": train_stats}
            save_progress(complete=False)
            if is_main:
                clear_step_state(run_dir)
                drop_superseded_checkpoint(ctx, stage)
        step_state = None

        t0 = time.perf_counter()
        policy = config.eval.future_tasks if continual else "all"
        row, info = evaluate_row(ctx, method, tasks_to_evaluate(policy, max(task_indices), len(ctx.tasks)),
                                 config.eval.task_id)
        if config.eval.save_predictions:
            write_predictions(ctx, predictions_path(run_dir, f"stage-{stage + 1:02d}"), info["predictions"],
                              f"stage-{stage + 1:02d}")
        ppl = general_perplexity(ctx, method, max(task_indices))
        last = stage == len(ctx.stages) - 1
        known = general_knowledge(ctx, method, max(task_indices)) \
            if config.eval.knowledge_every_stage or last else None
        if known is not None:
            knowledge.append(known)
        eval_s = time.perf_counter() - t0
        if ppl is not None:
            general_ppl.append(ppl)
        R.append(row)
        stage_records.append({"tasks": [names[i] for i in task_indices], "train": train_stats, "eval_s": eval_s,
                              **({"locator": info["locator"]} if info["locator"] else {})})
        trained = None
        save_progress(complete=False)
        log(f"stage {stage + 1}/{len(ctx.stages)} [{', '.join(names[i] for i in task_indices)}]: "
            f"{train_stats['steps']} steps, loss {train_stats['final_loss']:.3f}, "
            f"{train_stats['tokens_per_s']:.0f} tok/s, train {train_stats['seconds']:.0f}s, eval {eval_s:.0f}s | "
            + "  ".join(f"{names[j]} {a:.1f}" for j, a in enumerate(row) if a is not None)
            + (f" | general ppl {ppl:.2f} ({100 * (ppl / general_ppl[0] - 1):+.1f} %)" if ppl is not None else "")
            + (f" | knowledge {known['mean']:.1f} ({known['mean'] - knowledge[0]['mean']:+.1f})" if known else ""))
    step_log.close()
    if (locate_record is None and getattr(method, "has_locator", False) and config.eval.locate_final
            and config.eval.task_id == "oracle"):
        t0 = time.perf_counter()
        locate_record = evaluate_located_final(
            ctx, method, predictions_path(run_dir, "final-located") if config.eval.save_predictions else None)
        timings["locate_eval_s"] = time.perf_counter() - t0
        log(f"final model with located task ids: AP {locate_record['AP']:.1f}, locator accuracy "
            + ", ".join(f"{k} {v:.1f} %" for k, v in locate_record["locator_by_kind"].items()))
    record = save_progress(complete=True)
    if is_main:
        from evolora.report import write_report

        write_report(run_dir)
    return record


def _trim_step_log(path: Path, completed: int, step_state: Optional[dict]) -> None:
    """Drops log lines of work that a resume will redo."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done = rec["stage"] < completed or (step_state is not None and rec["stage"] == step_state["stage"]
                                            and rec["step"] <= step_state["step"])
        if done:
            keep.append(line)
    atomic.write_text(path, "".join(x + "\n" for x in keep))


def _metrics_record(config, method, ctx, names, R, zero_shot, stage_records, timings, complete: bool,
                    general_ppl: list[float], knowledge: Optional[list[dict]] = None) -> dict:
    params = count_parameters(ctx.model, method)
    n_tasks = len(names)
    continual = all(len(s) == 1 for s in ctx.stages)
    summary = compute_metrics(R, zero_shot, continual) if complete else {}
    drift = [100.0 * (p / general_ppl[0] - 1.0) for p in general_ppl[1:]] if general_ppl else []
    if complete and drift:
        summary["drift_pct"] = drift[-1]
    if complete and knowledge and len(knowledge) > 1:
        summary["knowledge_pts"] = knowledge[-1]["mean"] - knowledge[0]["mean"]
    forgetting = summary.get("forgetting_per_task") or [None] * n_tasks
    return {
        "name": config.name,
        "method": method.name,
        "model": config.model.name,
        "stream": {"name": config.data.stream, "order": config.data.order, "tasks": names},
        "eval_mode": config.eval.mode,
        "complete": complete,
        "R": R,
        "zero_shot": zero_shot,
        "metrics": summary,
        "per_task": {
            name: {"final": R[-1][j] if R else None, "zero_shot": zero_shot[j] if zero_shot else None,
                   "forgetting": forgetting[j] if j < n_tasks - 1 and j < len(forgetting) else None}
            for j, name in enumerate(names)
        },
        "general": {"text": config.eval.general_text, "perplexity": general_ppl,
                    "drift_pct_per_stage": drift} if general_ppl else None,
        "knowledge": {"tasks": list(config.eval.general_tasks), "norm": config.eval.choice_norm,
                      "per_stage": knowledge} if knowledge else None,
        "parameters": {**params, "added_per_task": params["added"] / n_tasks if n_tasks else 0},
        "stages": stage_records,
        "timings": {**timings, "train_s": sum(s["train"]["seconds"] for s in stage_records),
                    "eval_s": sum(s["eval_s"] for s in stage_records) + timings.get("zero_shot_eval_s", 0.0)},
        "method_metrics": method.extra_metrics(),
    }
