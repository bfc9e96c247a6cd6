"""Kernel-launching operations per training step, each method's divided by a plain PEFT LoRA step's.

A 135M model's step on a GPU at a small batch waits on kernel launches, not on arithmetic, so the count of
operations that launch a kernel predicts its GPU step time better than a CPU timing does, and it can be
taken on any machine. Counted with a dispatch mode over forward and backward (what reaches the kernels
after autograd); view operations launch nothing and the optimizer is left out (on a GPU AdamW runs as a few
multi-tensor kernels). The PEFT reference is one batch of equal-length prompts, so no padding mask; a padded
batch adds the mask's operations.

    python benchmarks/launch_count.py [--models smollm2-135m] [--methods seq_lora moe_cl] [--stage 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the same synthetic tasks and configs as the timings)

from evolora.engine import StepLog, train_stage  # noqa: E402

NO_KERNEL = {"view", "t", "transpose", "_unsafe_view", "slice", "unsqueeze", "squeeze", "expand", "detach", "select",
         "permute", "alias", "as_strided", "unflatten", "_reshape_alias", "split", "unbind", "lift_fresh",
         "split_with_sizes", "_local_scalar_dense"}
"""Views (no data moves) and reading a scalar back (a copy, not a kernel)."""


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def without_optimizer(counter: LaunchCounter):
    step = torch.optim.AdamW.step

    def paused_step(self, *args, **kwargs):
        counter.paused = True
        try:
            return step(self, *args, **kwargs)
        finally:
            counter.paused = False
    return paused_step


def peft_step_count(model_name: str, batch: int, dropout: float = 0.0) -> int:
    model, [(b, labels)] = speed.plain_peft(model_name, batch, steps=1, dropout=dropout)
    model.train()
    for counted in (False, True):  # the same batch twice: the first pass warms up
        with LaunchCounter() if counted else contextlib.nullcontext() as counter:
            speed.plain_peft_loss(model, b, labels).backward()
        model.zero_grad()
    return sum(counter.counts.values())


def method_step_count(model_name: str, method_name: str, batch: int, stage: int, steps: int = 4):
    ctx, method, index, examples = speed.last_stage(model_name, method_name, batch, steps, stage)
    counter = LaunchCounter()
    original = torch.optim.AdamW.step
    torch.optim.AdamW.step = without_optimizer(counter)
    try:
        with counter:
            result = train_stage(ctx, method, index, examples, StepLog(None), 0)
    finally:
        torch.optim.AdamW.step = original
    return counter.counts, result["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--methods", nargs="+", default=["seq_lora", "moe_cl", "moe_cl:variant=evolora", "cmoe"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--peft-dropout", type=float, default=0.0,
                        help="LoRA dropout of the plain PEFT reference (moe_cl's reference form uses 0.05)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for model_name in args.models:
        reference = peft_step_count(model_name, args.batch, args.peft_dropout)
        print(f"\n== {model_name}, batch {args.batch}, stage {args.stage} ==")
        print(f"plain PEFT LoRA step (LoRA dropout {args.peft_dropout}): {reference} kernel-launching operations "
              "(reference = 1.00)")
        print(f"{'method':>18}  per step  ÷ PEFT  most frequent")
        for method_name in args.methods:
            with speed.fusion(method_name):
                counts, steps = method_step_count(model_name, method_name, args.batch, args.stage)
            per_step = sum(counts.values()) / steps
            top = ", ".join(f"{name} {n / steps:.0f}" for name, n in counts.most_common(5))
            print(f"{method_name:>18}  {per_step:8.0f}  {per_step / reference:6.2f}  {top}")


if __name__ == "__main__":
    main()
