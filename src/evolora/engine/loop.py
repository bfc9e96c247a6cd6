"""The training loop of one stage, top to bottom: batches, optimizer and schedule, then for each step the
forward pass under the method's batch routing, the task loss plus the method's loss terms, backward, clipping,
the update, the step log and (every `checkpoint_every` updates) the step state a resume continues from."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from evolora import runfolder
from evolora.data.batching import collate_train, length_grouped_batches
from evolora.data.prompting import Encoded
from evolora.engine.context import RunContext
from evolora.engine.sharding import shard_model, wants_sharding
from evolora.engine.state import restore_step_state, save_step_state
from evolora.engine.zero import configure as configure_zero, continue_engine, is_zero, is_zero3
from evolora.errors import EvoloraError
from evolora.methods import Method, StepInputs
from evolora.models import answer_loss


class StepLog:
    """The run folder's steps.jsonl (one JSON line per logged step) and the trackers, which get the same figures
    under `train/` at the global step."""

    def __init__(self, run_dir: Optional[Path], trackers=None):
        self.path = run_dir / runfolder.STEPS if run_dir else None
        self.trackers = trackers

    def write(self, record: dict, global_step: int) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log({f"train/{k}": v for k, v in record.items() if k not in ("stage", "step")}, global_step)


class Interrupted(EvoloraError):
    """Ctrl-C during training: the step state was saved and the run can be resumed."""


def partitions_optimizer(ctx: RunContext) -> bool:
    """Whether this launch splits the optimizer state over the processes (FSDP, DeepSpeed ZeRO): such a launch
    saves no mid-stage step state and cannot continue one."""
    return wants_sharding(ctx) or (ctx.accelerator.num_processes > 1 and is_zero(ctx.accelerator))


def train_stage(ctx: RunContext, method: Method, stage: int, examples: list[Encoded], step_log: StepLog,
                global_step: int, resume: Optional[dict] = None) -> dict:
    """Trains one stage. `resume` is a saved step state of this stage: training continues after it."""
    cfg = ctx.config.train
    model, accelerator = ctx.model, ctx.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EvoloraError(f"method {method.name}: nothing to train at stage {stage}")
    # master weights in fp32; autocast runs the matmuls in the model's dtype (ZeRO-3's engine holds its own)
    for p in params if ctx.zero_engine is None else ():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    sharded = wants_sharding(ctx)
    if sharded:  # FSDP: the model's parameters become shards, so the optimizer takes them after this
        shard_model(ctx, method)
        params = [p for p in model.parameters() if p.requires_grad]
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

    # One process: the model is used as is, under autocast. Several: model and optimizer are prepared
    # together (DDP, or DeepSpeed's engine, as the launch configured) at every stage, since methods may have
    # added parameters since the last one; ZeRO-3 keeps its first engine for the run, with a fresh optimizer
    # state each stage. DeepSpeed's engine scales the loss for accumulation, clips and steps inside
    # accelerator.backward (its optimizer's step and zero_grad below do nothing); engine/zero.py. Sharded
    # (train.fsdp): the model is already FSDP's and the optimizer works on the shards.
    zero = world > 1 and is_zero(accelerator)
    if ctx.zero_engine is not None:
        train_model, optimizer, inner = continue_engine(ctx, cfg.lr)
    else:
        inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
                              inner, num_warmup_steps=int(cfg.warmup_ratio * total_updates),
                              num_training_steps=total_updates)
    if sharded:
        train_model, optimizer = model, inner
    elif world > 1 and ctx.zero_engine is None:
        if zero:
            configure_zero(accelerator, cfg, world, method)
        train_model, optimizer = accelerator.prepare(model, inner)
        if zero and is_zero3(accelerator):
            ctx.zero_engine = (train_model, optimizer)
    elif world == 1:
        train_model, optimizer = model, accelerator.prepare_optimizer(inner)
    first_step = 0
    if resume is not None:
        restore_step_state(ctx.run_dir, resume, model, optimizer, scheduler)
        first_step = resume["step"] + 1
    pad_id = ctx.tokenizer.pad_token_id
    names = ", ".join(ctx.tasks[i].name for i in ctx.stages[stage])
    every = 0 if partitions_optimizer(ctx) else cfg.checkpoint_every  # a partitioned one is not saved mid-stage
    is_main = accelerator.is_main_process

    def save_state(step: int) -> None:
        if is_main and ctx.run_dir is not None:
            save_step_state(ctx.run_dir, stage, step, model, optimizer, scheduler,
                            {"global_step": global_step + step, "processes": world})

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
                accelerator.sync_gradients = sync  # DeepSpeed's engine steps where accelerate says a sync is due
                accelerator.backward(loss if zero else loss / cfg.grad_accum)
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
    if ctx.zero_engine is None:  # ZeRO-3's engine stays: its hooks gather the parameters for every forward
        accelerator.free_memory()
    seconds = time.perf_counter() - started
    return {"steps": len(batches), "updates": total_updates, "tokens": tokens * world, "seconds": seconds,
            "tokens_per_s": tokens * world / seconds if seconds else 0.0, "final_loss": running,
            **({"resumed_at_step": first_step} if first_step else {})}
