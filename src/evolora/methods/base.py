"""The method interface: named hooks the engine calls in a fixed order, without knowing which method
runs (Avalanche-style). A method overrides only the hooks it needs.

Per run:    setup
Per stage:  grow -> before_stage -> training_examples -> [loss_terms each step] -> after_stage
Inference:  route(task_index) wraps every forward pass on that task's inputs; a method with a task
            locator (`has_locator`) also answers `locate` / `locate_new` (no task id at inference).
On reload:  setup, grow for every finished stage, the checkpoint's tensors (less `reload_skip`), then
            `refit` for options the caller changed."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

RunContext = Any
"""The engine's run context (evolora.engine.RunContext: config, model, tokenizer, prompts, tasks, device,
accelerator, stages, log). Methods sit below the engine, so they name it without importing it."""


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes, bytes): equal exactly when the tensors are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StepInputs:
    """What a loss hook sees of one training step."""

    batch: Any
    """evolora.data.batching.Batch"""
    outputs: Any
    """the model's output (with hidden states when any hook asked for them)"""
    task_loss: torch.Tensor
    stage: int
    model: Any = None
    """the model being trained (wrapped for distributed training): for hooks that run extra forwards"""


class Method:
    name: ClassVar[str] = "base"
    Options: ClassVar[type] = None
    """A dataclass of the method's options (validated from `method.options`)."""
    needs_hidden_states: ClassVar[bool] = False
    adapters_only: ClassVar[bool] = False
    """The method trains PEFT adapters only, never a base weight, so the base can be quantized (QLoRA)."""
    fsdp_ready: ClassVar[bool] = False
    """Whether the model may be sharded over processes (train.fsdp): every parameter is in place after setup and
    every forward the method runs happens on every process alike."""

    def __init__(self, options=None):
        self.options = options if options is not None else (self.Options() if self.Options else None)
        self.base_parameter_ids: set[int] = set()
        """id() of the base model's parameters; wrappers such as PEFT rename them but keep the objects."""

    # --- structure -------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        """Wrap or modify the model once per run; return the model to train."""
        return model

    def stages(self, num_tasks: int) -> list[list[int]]:
        """Which tasks each training stage holds: one task per stage for a continual method."""
        return [[i] for i in range(num_tasks)]

    def grow(self, stage: int, ctx: RunContext) -> None:
        """Add the capacity a stage needs (new experts, new adapters). Also replayed on reload."""

    # --- training --------------------------------------------------------------------------------
    def before_stage(self, stage: int, ctx: RunContext) -> None:
        """Work done before training a stage (probing, snapshots)."""

    def training_examples(self, stage: int, examples: list, ctx: RunContext) -> list:
        """The encoded examples to train this stage on (replay methods add to them)."""
        return examples

    def loss_terms(self, step: StepInputs, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Extra loss terms added to the task loss, by name (they are logged under these names)."""
        return {}

    def after_stage(self, stage: int, ctx: RunContext) -> None:
        """Work after a stage (freeze experts, Fisher, fit a locator)."""

    # --- inference -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, task_index: int | None) -> Iterator[None]:
        """Route the model to a task's parameters while inside; None means no task id is known."""
        yield

    @contextlib.contextmanager
    def batch_route(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Route each sample of a training batch by its own task id (mixed-task batches); the engine passes
        the ids on the CPU, so reading them never waits on the device."""
        yield

    def answer_state(self, task_index: int) -> dict[str, torch.Tensor] | None:
        """The tensors that, with the frozen base model, decide the answers on a task when routed to it with its
        task id; None: not declared (every evaluation scores the task again). The engine reuses a task's score
        while these tensors are unchanged (eval.cache)."""
        return None

    # --- task location (methods that answer without a task id) ----------------------------------
    has_locator: ClassVar[bool] = False
    locator_kinds: ClassVar[tuple[str, ...]] = ()
    """The density models the locator can score with (evaluation reports the accuracy of each)."""

    @property
    def locator_kind(self) -> str | None:
        """The kind of density model `locate` uses unless told otherwise."""
        return None

    def locate(self, ctx: RunContext, key: Any, prompt_ids: list[list[int]], kind: str | None = None) -> list[int]:
        """The stage-level task index each prompt belongs to, by the locator (`kind` or the default). `key`
        names the prompts (e.g. ("test", task, shard)) so features of the same prompts can be cached."""
        raise NotImplementedError(f"{self.name} has no task locator")

    def locate_new(self, ctx: RunContext, examples: list) -> list[int]:
        """The task of each new input (no task known: each is framed as every task would frame it)."""
        raise NotImplementedError(f"{self.name} has no task locator")

    # --- checkpointing ---------------------------------------------------------------------------
    def checkpoint_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that define what this method learned: everything not in the base model, plus base
        parameters that are trained."""
        return {name: p.detach() for name, p in model.named_parameters()
                if id(p) not in self.base_parameter_ids or p.requires_grad}

    def load_checkpoint_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = dict(model.named_parameters())
        missing = [k for k in state if k not in own]
        if missing:
            raise KeyError(f"checkpoint tensors not in the model: {missing[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].dtype))

    def kept_scores(self) -> dict[str, Any]:
        """Scores the method keeps between stages, each under a key of everything that decides it (JSON-able).
        The engine keeps them in the run folder with each stage's checkpoint (when `eval.cache` is on), so a
        resumed run computes again only what changed, as the uninterrupted run would."""
        return {}

    def restore_kept_scores(self, kept: dict[str, Any]) -> None:
        """Takes back what `kept_scores` gave, from a run folder made under the same settings; raises
        ValueError, KeyError or TypeError on anything else (the engine then ignores the file)."""

    def reload_skip(self, changed: set[str]) -> str | None:
        """On reload with changed options (names under `method.options`): a top-level module whose saved
        tensors no longer apply and are left for `refit` to rebuild, or None."""
        return None

    def refit(self, ctx: RunContext, changed: set[str]) -> None:
        """On reload, after the final checkpoint is loaded: rebuild what depends on the changed options."""

    def eval_record(self) -> dict[str, Any]:
        """Figures a re-evaluation of a finished run records beside its accuracies (eval.json)."""
        return {}

    # --- export ------------------------------------------------------------------------------------
    export_form: ClassVar[str] = "none"
    """What `evolora export` writes: "lora" (PEFT LoRA adapters, `export_adapters`), "full" (the whole model,
    which the method trains), or "none" (`export_note` says why)."""
    export_note: ClassVar[str] = ""

    def export_adapters(self, task_index: int | None) -> list[str]:
        """The PEFT adapters whose sum answers the task (None: no task named)."""
        return ["default"]

    def stage_metrics(self, stage: int) -> dict[str, Any]:
        """Figures of the stage just finished, asked for after `after_stage`. They are kept with the stage's
        record in progress.json, so a resumed run still has those of the stages before the interruption."""
        return {}

    def extra_metrics(self) -> dict[str, Any]:
        return {}


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    """Dropout on the LoRA input; it costs ~20 % of a CPU training step (a mask over every input)."""
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError("r must be > 0")
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


def check_target_modules(model: torch.nn.Module, targets: list[str], linear_only: bool = False) -> None:
    """Every target names modules of the model that LoRA can adapt (linear layers; PEFT also takes embeddings
    and convolutions, expert layers only linear ones): anything else is a one-line config error."""
    from evolora.errors import ConfigError

    kinds: tuple = (torch.nn.Linear,) if linear_only else \
        (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    by_leaf: dict[str, list[torch.nn.Module]] = {}
    for name, module in model.named_modules():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    linear = sorted(leaf for leaf, modules in by_leaf.items() if any(isinstance(m, torch.nn.Linear) for m in modules))
    for target in targets:
        if target not in by_leaf:
            raise ConfigError(f"method.options.target_modules: {str(target)[:60]!r} is not a module of this model "
                              f"(linear modules: {', '.join(linear)})")
        if not all(isinstance(m, kinds) or type(m).__name__ == "Conv1D" and not linear_only for m in by_leaf[target]):
            kind = type(by_leaf[target][0]).__name__
            raise ConfigError(f"method.options.target_modules: {str(target)[:60]!r} is a {kind}, which LoRA cannot "
                              f"adapt here (linear modules: {', '.join(linear)})")
