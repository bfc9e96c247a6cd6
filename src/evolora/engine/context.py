"""What a run works with: the stream, the model, the method (its setup applied) and the accelerator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from evolora.config import RunConfig
from evolora.data import Task, build_stream
from evolora.data.prompting import Encoded, PromptBuilder
from evolora.engine.zero import zero_stage
from evolora.methods import Method, build_method
from evolora.models import bf16_emulation_note, load_model


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
    eval_cache: dict = field(default_factory=dict)
    """Per task: (fingerprint of what answers it, its last result); see eval.cache."""
    eval_cache_hits: int = 0
    sharded: bool = False
    """Whether the model's parameters are sharded over the processes (train.fsdp; engine/sharding.py)."""
    zero_engine: Any = None
    """Under DeepSpeed ZeRO-3, (the run's engine, its optimizer): it holds the partitioned parameters and gathers
    them for every forward (engine/zero.py)."""

    @property
    def partitioned(self) -> bool:
        """Whether each process holds only part of the parameters (FSDP or ZeRO-3): every process must run the
        same forwards."""
        return self.sharded or self.zero_engine is not None

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
    # CPU processes of a DeepSpeed launch run DeepSpeed's engine (engine/zero.py), not accelerate's MULTI_CPU.
    return Accelerator(cpu=device.type == "cpu" and zero_stage() is None, mixed_precision=mixed_precision)


def build_context(config: RunConfig, run_dir: Optional[Path], log=print,
                  before_setup: Optional[Callable[["RunContext"], None]] = None) -> tuple[RunContext, Method]:
    """Stream, model, method and accelerator, with the method's setup applied. `before_setup` sees the
    bare base model (the zero-shot evaluation runs there)."""
    seed_everything(config.train.seed)
    tasks = build_stream(config.data)
    method = build_method(config.method)
    if config.model.quantization and not method.adapters_only:
        from evolora.errors import ConfigError

        raise ConfigError(f"model.quantization: {method.name} trains more than adapters on a quantized base; "
                          "use a LoRA method (seq_lora, replay, ewc, lwf, multitask, olora, per_task_lora)")
    model, tokenizer, device = load_model(config.model)
    if note := bf16_emulation_note(next(model.parameters()).dtype, device):
        log(note)
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
    def numel(p):  # a ZeRO-3 parameter holds its partition; ds_numel is the whole count
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    added = sum(numel(p) for p in model.parameters() if id(p) not in method.base_parameter_ids)
    base = sum(numel(p) for p in model.parameters() if id(p) in method.base_parameter_ids)
    return {"trainable": trainable, "added": added, "base": base}
