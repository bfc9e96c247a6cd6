"""The run, top to bottom: load the stream and the model, let the method shape the model, evaluate
zero-shot, then for each stage: grow -> before_task -> train -> after_task -> checkpoint -> evaluate.
The loop calls the method's hooks and never names a method."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from evolora import atomic
from evolora.config import RunConfig, dump_config
from evolora.data import Task, build_stream
from evolora.data.batching import collate_train, length_grouped_batches
from evolora.data.prompting import IGNORE, Encoded, PromptBuilder
from evolora.errors import EvoloraError
from evolora.evaluation import evaluate_task
from evolora.methods import Method, StepInputs, build_method
from evolora.metrics import compute_metrics
from evolora.models import load_model


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

    return Accelerator(cpu=device.type == "cpu", mixed_precision=autocast_dtype(config, model),
                       gradient_accumulation_steps=config.train.grad_accum)


def build_context(config: RunConfig, run_dir: Optional[Path], log=print,
                  before_setup: Optional[Callable[["RunContext"], None]] = None) -> tuple[RunContext, Method]:
    """Stream, model, method and accelerator, with the method's setup applied. `before_setup` sees the
    bare base model (the zero-shot evaluation runs there)."""
    seed_everything(config.train.seed)
    tasks = build_stream(config.data)
    model, tokenizer, device = load_model(config.model)
    method = build_method(config.method)
    method.base_parameter_names = {name for name, _ in model.named_parameters()}
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
    added = sum(p.numel() for n, p in model.named_parameters() if n not in method.base_parameter_names)
    base = sum(p.numel() for n, p in model.named_parameters() if n in method.base_parameter_names)
    return {"trainable": trainable, "added": added, "base": base}


# --- training ----------------------------------------------------------------------------------------

class StepLog:
    def __init__(self, run_dir: Optional[Path], tensorboard: bool):
        self.path = run_dir / "steps.jsonl" if run_dir else None
        self.writer = None
        if run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
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


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; `logits` are the last K+1 columns' logits."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def train_stage(ctx: RunContext, method: Method, stage: int, examples: list[Encoded], step_log: StepLog,
                global_step: int) -> dict:
    cfg = ctx.config.train
    model, accelerator = ctx.model, ctx.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EvoloraError(f"method {method.name}: nothing to train at stage {stage}")
    for p in params:  # master weights in fp32; autocast runs the matmuls in the model's dtype
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    from transformers import get_scheduler

    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_batches = max(1, round(batches_per_epoch * cfg.epochs))
    total_updates = math.ceil(total_batches / cfg.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_updates),
                              num_training_steps=total_updates)
    # One process: the model is used as is, under autocast. Several: it is wrapped (DDP) per stage, since
    # methods may have added parameters since the last stage.
    if accelerator.num_processes > 1:
        model = accelerator.prepare_model(model)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    pad_id = ctx.tokenizer.pad_token_id
    names = ", ".join(ctx.tasks[i].name for i in ctx.stages[stage])

    batches: list[list[Encoded]] = []
    epoch = 0
    while len(batches) < total_batches:
        batches.extend(length_grouped_batches(examples, cfg.batch_size, seed=cfg.seed * 1000 + stage * 97 + epoch))
        epoch += 1
    batches = batches[:total_batches]

    from tqdm.auto import tqdm

    model.train()
    tokens, started, running = 0, time.perf_counter(), None
    bar = tqdm(batches, desc=f"stage {stage + 1}/{len(ctx.stages)} [{names}]", leave=False, disable=None)
    for step, items in enumerate(bar):
        batch = collate_train(items, pad_id).to(ctx.device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1,
                                output_hidden_states=method.needs_hidden_states)
                task_loss = answer_loss(outputs.logits, batch.labels)
                terms = method.loss_terms(StepInputs(batch, outputs, task_loss, stage), ctx)
                loss = task_loss + sum(terms.values()) if terms else task_loss
            if not torch.isfinite(loss):
                raise EvoloraError(f"loss is {loss.item()} at stage {stage + 1} ({names}), step {step}: "
                                   "lower train.lr or check the data")
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += batch.n_tokens
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        if step % ctx.config.train.log_every == 0 or step == len(batches) - 1:
            record = {"stage": stage, "step": step, "loss": value, "task_loss": task_loss.item(),
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed}
            record.update({k: v.item() for k, v in terms.items()})
            step_log.write(record, global_step + step)
    bar.close()
    model.eval()
    ctx.model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    seconds = time.perf_counter() - started
    return {"steps": len(batches), "updates": total_updates, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "final_loss": running}


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
                             "eval": ctx.config.eval.model_dump(exclude={"future_tasks", "zero_shot"}),
                             "autocast": autocast_dtype(ctx.config, ctx.model), "version": __version__},
                            sort_keys=True)
    path = cache_dir() / "zero_shot" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key_source:
                return cached["row"]
        except (json.JSONDecodeError, KeyError):
            pass
    row, _ = evaluate_row(ctx, Method(), list(range(len(ctx.tasks))))
    atomic.write_json(path, {"key": key_source, "row": row})
    return row


def evaluate_row(ctx: RunContext, method: Method, task_indices: list[int]) -> tuple[list, dict]:
    cfg = ctx.config.eval
    row: list[Optional[float]] = [None] * len(ctx.tasks)
    predictions = {}
    ctx.model.eval()
    with ctx.accelerator.autocast():
        for j in task_indices:
            with method.route(j):
                result = evaluate_task(ctx.model, ctx.tasks[j], j, ctx.prompts, ctx.device, cfg.mode,
                                       cfg.batch_size, cfg.max_new_tokens)
            row[j] = result.accuracy
            predictions[ctx.tasks[j].name] = result.predictions
    return row, predictions


# --- checkpoints -------------------------------------------------------------------------------------

def checkpoint_path(run_dir: Path, stage: int) -> Path:
    return run_dir / "checkpoints" / f"stage-{stage + 1:02d}.safetensors"


def save_checkpoint(ctx: RunContext, method: Method, stage: int) -> Path:
    path = checkpoint_path(ctx.run_dir, stage)
    names = [ctx.tasks[i].name for i in ctx.stages[stage]]
    atomic.save_safetensors(path, method.checkpoint_state(ctx.model),
                            metadata={"stage": str(stage), "tasks": ",".join(names), "method": method.name})
    if ctx.config.output.keep_checkpoints == "last" and stage > 0:
        previous = checkpoint_path(ctx.run_dir, stage - 1)
        previous.unlink(missing_ok=True)
    return path


def load_checkpoint(ctx: RunContext, method: Method, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise EvoloraError(f"{path}: unreadable checkpoint ({exc})") from None
    try:
        method.load_checkpoint_state(ctx.model, state)
    except KeyError as exc:
        raise EvoloraError(f"{path}: does not match the model of this run ({exc.args[0]})") from None


# --- the run -----------------------------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise EvoloraError(f"{run_dir}: run folder exists and is not empty; choose another output.dir "
                               "or set output.overwrite=true")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run(config: RunConfig, run_dir: Optional[Path] = None, log: Callable[[str], None] = print) -> dict:
    run_dir = Path(run_dir) if run_dir else config.run_dir()
    prepare_run_dir(run_dir, config.output.overwrite)
    atomic.write_text(run_dir / "config.yaml", dump_config(config))
    timings: dict[str, Any] = {}
    started = time.perf_counter()

    zero_shot = None

    def evaluate_zero_shot(ctx: RunContext) -> None:
        nonlocal zero_shot
        names = [t.name for t in ctx.tasks]
        log(f"{config.method.name} on {len(names)} tasks: {' -> '.join(names)} ({sum(len(t.train) for t in ctx.tasks)}"
            f" train / {sum(len(t.test) for t in ctx.tasks)} test examples)")
        if config.eval.zero_shot:
            t0 = time.perf_counter()
            zero_shot = zero_shot_row(ctx)
            timings["zero_shot_eval_s"] = time.perf_counter() - t0
            log("zero-shot: " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, zero_shot)))

    ctx, method = build_context(config, run_dir, log, before_setup=evaluate_zero_shot)
    timings["setup_s"] = time.perf_counter() - started - timings.get("zero_shot_eval_s", 0.0)
    names = [t.name for t in ctx.tasks]

    step_log = StepLog(run_dir, config.output.tensorboard)
    R: list[list[Optional[float]]] = []
    stage_records = []
    global_step = 0
    continual = all(len(s) == 1 for s in ctx.stages)
    for stage, task_indices in enumerate(ctx.stages):
        method.grow(stage, ctx)
        method.before_task(stage, ctx)
        examples = [enc for i in task_indices for enc in ctx.encode_train(i)]
        examples = method.training_examples(stage, examples, ctx)
        train_stats = train_stage(ctx, method, stage, examples, step_log, global_step)
        global_step += train_stats["steps"]
        method.after_task(stage, ctx)
        save_checkpoint(ctx, method, stage)

        t0 = time.perf_counter()
        seen_upto = max(task_indices)
        policy = config.eval.future_tasks if continual else "all"
        row, predictions = evaluate_row(ctx, method, tasks_to_evaluate(policy, seen_upto, len(ctx.tasks)))
        eval_s = time.perf_counter() - t0
        R.append(row)
        stage_records.append({"tasks": [names[i] for i in task_indices], "train": train_stats, "eval_s": eval_s})
        log(f"stage {stage + 1}/{len(ctx.stages)} [{', '.join(names[i] for i in task_indices)}]: "
            f"{train_stats['steps']} steps, loss {train_stats['final_loss']:.3f}, "
            f"{train_stats['tokens_per_s']:.0f} tok/s, train {train_stats['seconds']:.0f}s, eval {eval_s:.0f}s | "
            + "  ".join(f"{names[j]} {a:.1f}" for j, a in enumerate(row) if a is not None))
        _write_metrics(run_dir, config, method, ctx, names, R, zero_shot, stage_records, timings, started,
                       continual, complete=False)
    step_log.close()
    metrics = _write_metrics(run_dir, config, method, ctx, names, R, zero_shot, stage_records, timings, started,
                             continual, complete=True)
    from evolora.report import write_report

    write_report(run_dir)
    return metrics


def _write_metrics(run_dir, config, method, ctx, names, R, zero_shot, stage_records, timings, started,
                   continual, complete: bool) -> dict:
    params = count_parameters(ctx.model, method)
    n_tasks = len(names)
    summary = compute_metrics(R, zero_shot, continual) if complete else {}
    record = {
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
                   "forgetting": (summary.get("forgetting_per_task") or [None] * n_tasks)[j]
                   if j < n_tasks - 1 else None}
            for j, name in enumerate(names)
        },
        "parameters": {**params, "added_per_task": params["added"] / n_tasks if n_tasks else 0},
        "stages": stage_records,
        "timings": {**timings, "train_s": sum(s["train"]["seconds"] for s in stage_records),
                    "eval_s": sum(s["eval_s"] for s in stage_records) + timings.get("zero_shot_eval_s", 0.0),
                    "total_s": time.perf_counter() - started},
        "method_metrics": method.extra_metrics(),
    }
    atomic.write_json(run_dir / "metrics.json", record)
    return record
