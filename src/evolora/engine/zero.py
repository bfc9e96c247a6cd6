"""DeepSpeed ZeRO launches (`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml ...`).

accelerate builds the DeepSpeed engine when the loop prepares the model and optimizer (every stage: methods may
add parameters between stages; the engine of the last stage is destroyed with its gradient hooks). What this
module adds to accelerate:
- on a machine without a GPU, the processes join through DeepSpeed's CPU accelerator over gloo (accelerate
  would otherwise make the launch plain DDP without a word, as it does with an FSDP launch on CPU), so the
  DeepSpeed path runs in CI on CPU processes;
- the engine's batch sizes, accumulation and clipping come from the run's `train` section (one source of
  truth): DeepSpeed scales the loss for accumulation and clips, so the loop does neither itself;
- ZeRO-2 partitions gradients and optimizer state, not parameters: every process holds the whole model, so
  evaluation and checkpoints work as under DDP. The optimizer state is partitioned, so no mid-stage step state
  is saved (a resume restarts the stage from its last checkpoint, as with train.fsdp).
- ZeRO-3 also partitions the parameters, and its engine's hooks gather them for every forward, so the first
  stage's engine is kept for the whole run (`RunContext.zero_engine`): only methods whose parameters are all in
  place after setup and whose forwards are the same on every process (`Method.fsdp_ready`) may use it; each
  stage restarts the optimizer's moments and schedule, as a new optimizer would; evaluation is not split over
  the processes (every one runs the same forwards); the eval cache is off (a partitioned parameter holds no
  values to fingerprint); checkpoints gather the full tensors (`gathered_state`)."""

from __future__ import annotations

import json
import os
from typing import Optional

from evolora.errors import EvoloraError


def zero_stage() -> Optional[int]:
    """The ZeRO stage of this process's DeepSpeed launch, or None when the launch is not DeepSpeed's."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and not stage:
        try:
            stage = json.loads(open(config_file, encoding="utf-8").read()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError) as err:
            raise EvoloraError(f"{config_file}: not a readable DeepSpeed JSON config ({type(err).__name__})") from None
    try:
        return int(stage) if stage is not None else 0
    except ValueError:
        raise EvoloraError(f"ACCELERATE_DEEPSPEED_ZERO_STAGE: expected 0-3, got {stage!r}") from None


def process_state_options(on_cpu: bool, stage: Optional[int]) -> dict:
    """Options of the process state (accelerate's PartialState) for a launch of ZeRO `stage` (None: not a
    DeepSpeed launch): CPU processes of a DeepSpeed launch join through DeepSpeed over gloo; any other CPU
    launch is accelerate's MULTI_CPU."""
    if stage is None:
        return {"cpu": on_cpu}
    return {"cpu": False, **({"backend": "gloo"} if on_cpu else {})}


def is_zero(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator, train, world: int, method) -> None:
    """The engine's batch sizes, gradient accumulation and clipping from the run's `train` section (DeepSpeed
    checks micro batch x accumulation x processes = train batch; no dataloader is prepared to infer them), once
    the method is known to suit the launch's stage."""
    if is_zero3(accelerator):
        check_zero3_method(method)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["train_batch_size"] = train.batch_size * train.grad_accum * world
    config["gradient_clipping"] = float(train.max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = train.grad_accum  # accelerate's own count, told the same


def is_zero3(accelerator) -> bool:
    return is_zero(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def check_zero3_method(method) -> None:
    if not method.fsdp_ready:
        raise EvoloraError(f"DeepSpeed ZeRO-3: method {method.name} cannot have its parameters partitioned (it adds "
                           "parameters per task or runs forwards on one process only); launch with ZeRO-2 "
                           "(configs/accelerate/deepspeed_zero2.yaml) or DDP")


def continue_engine(ctx, lr: float):
    """The run's ZeRO-3 engine for another stage: (engine, its optimizer wrapper, the torch optimizer inside),
    the torch optimizer's moments cleared and its learning rate back at `lr`, as a new optimizer's would be."""
    engine, wrapper = ctx.zero_engine
    inner = engine.optimizer.optimizer
    inner.state.clear()
    for group in inner.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return engine, wrapper, inner


def gathered_state(module, state_fn) -> dict:
    """`state_fn(module)`'s tensors, gathered whole from ZeRO-3's partitions onto the CPU (a collective: every
    process calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: t.detach().cpu().clone() for name, t in state_fn(module).items()}
