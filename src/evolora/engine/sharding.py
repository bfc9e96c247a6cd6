"""FSDP (`train.fsdp`): parameters, gradients and optimizer state sharded over the processes with torch's
FSDP2 (`fully_shard`, one unit per decoder layer plus the root), on GPUs (NCCL) and CPUs (gloo) alike —
`accelerate` turns an FSDP launch on CPUs into plain DDP, so evolora shards the model itself.

A sharded model's forward gathers each layer's parameters from every process, so every process must run the
same forwards: evaluation is not split over the processes (each scores every example; see `eval_shard`), and
only methods whose parameters are all in place after setup and whose hooks run the same forwards on every
process (`Method.fsdp_ready`) may shard. Checkpoints gather the full tensors (`checkpoint_tensors`)."""

from __future__ import annotations

import torch

from evolora.engine.context import RunContext
from evolora.errors import EvoloraError


def wants_sharding(ctx: RunContext) -> bool:
    return ctx.config.train.fsdp and ctx.accelerator.num_processes > 1


def shard_model(ctx: RunContext, method) -> None:
    """Shards ctx.model in place (once per run: its parameters are fixed after setup, so later stages reuse it)
    and leaves every unit's parameters as shards, which is what the optimizer must hold."""
    if ctx.sharded:
        reshard(ctx)
        return
    if not method.fsdp_ready:
        raise EvoloraError(f"train.fsdp: method {method.name} cannot be sharded (it adds parameters per task or "
                           "runs forwards on one process only); use DDP (train.fsdp: false)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from evolora.methods.experts import decoder_layers

    base_names = {name for name, p in ctx.model.named_parameters() if id(p) in method.base_parameter_ids}
    mesh = init_device_mesh(ctx.device.type, (ctx.accelerator.num_processes,))
    for layer in decoder_layers(ctx.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(ctx.model, mesh=mesh, reshard_after_forward=True)
    # sharding puts new parameter objects in place: the method knows the base model's by identity
    method.base_parameter_ids = {id(p) for name, p in ctx.model.named_parameters() if name in base_names}
    ctx.sharded = True


def reshard(ctx: RunContext) -> None:
    """Puts every unit's sharded parameters back in its module. A unit whose parameters were gathered for a
    forward and not freed holds whole tensors in their place: an optimizer built on them would update copies
    that the next gather overwrites."""
    from torch.distributed.fsdp import FSDPModule

    for module in ctx.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def checkpoint_tensors(ctx: RunContext, method) -> dict[str, torch.Tensor]:
    """The method's checkpoint tensors; from a sharded model, each gathered whole on the CPU (a collective:
    every process calls it)."""
    if ctx.zero_engine is not None:
        from evolora.engine.zero import gathered_state

        return gathered_state(ctx.model, method.checkpoint_state)
    if not ctx.sharded:
        return method.checkpoint_state(ctx.model)
    from torch.distributed.tensor import DTensor

    reshard(ctx)
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in method.checkpoint_state(ctx.model).items()}


def eval_shard(ctx: RunContext) -> tuple[int, int]:
    """(this process's index, number of shards) for splitting evaluation examples: every process scores every
    example when the model is sharded or partitioned (its forwards must run in step on every process)."""
    if ctx.partitioned:
        return 0, 1
    return ctx.accelerator.process_index, ctx.accelerator.num_processes
