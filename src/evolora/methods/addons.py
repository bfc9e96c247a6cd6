"""Add-ons: hooks that compose with any method (e.g. GeRe's general replay on seq_ft, seq_lora or moe_cl).
`WithAddOns` is itself a Method: the engine sees one set of hooks. Add-ons run after the method in every
hook, except `setup`, where they see the bare base model first (to take reference measurements on it)."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch

from evolora.methods.base import Method, StepInputs


class AddOn:
    name: ClassVar[str] = "addon"
    Options: ClassVar[type] = None
    needs_hidden_states: ClassVar[bool] = False
    fsdp_ready: ClassVar[bool] = False
    """As Method.fsdp_ready, for what the add-on adds."""

    def __init__(self, options=None):
        self.options = options if options is not None else (self.Options() if self.Options else None)

    def setup(self, base_model: torch.nn.Module, ctx) -> None:
        """Sees the bare base model before the method wraps it."""

    def before_stage(self, stage: int, ctx) -> None: ...

    def training_examples(self, stage: int, examples: list, ctx) -> list:
        return examples

    def loss_terms(self, step: StepInputs, ctx) -> dict[str, torch.Tensor]:
        return {}

    def after_stage(self, stage: int, ctx) -> None: ...

    def extra_metrics(self) -> dict[str, Any]:
        return {}


class WithAddOns(Method):
    """A method with add-ons; its name is `method+addon+...`, as in the results table."""

    def __init__(self, method: Method, addons: list[AddOn]):
        super().__init__(method.options)
        self.method, self.addons = method, addons
        self.name = "+".join([method.name, *(a.name for a in addons)])
        self.needs_hidden_states = method.needs_hidden_states or any(a.needs_hidden_states for a in addons)

    @property
    def base_parameter_ids(self):
        return self.method.base_parameter_ids

    @base_parameter_ids.setter
    def base_parameter_ids(self, ids):
        if hasattr(self, "method"):
            self.method.base_parameter_ids = ids

    def setup(self, model, ctx):
        for addon in self.addons:
            addon.setup(model, ctx)
        return self.method.setup(model, ctx)

    def stages(self, num_tasks):
        return self.method.stages(num_tasks)

    def grow(self, stage, ctx):
        self.method.grow(stage, ctx)

    def before_stage(self, stage, ctx):
        self.method.before_stage(stage, ctx)
        for addon in self.addons:
            addon.before_stage(stage, ctx)

    def training_examples(self, stage, examples, ctx):
        examples = self.method.training_examples(stage, examples, ctx)
        for addon in self.addons:
            examples = addon.training_examples(stage, examples, ctx)
        return examples

    def loss_terms(self, step, ctx):
        terms = dict(self.method.loss_terms(step, ctx))
        for addon in self.addons:
            terms.update(addon.loss_terms(step, ctx))
        return terms

    def after_stage(self, stage, ctx):
        self.method.after_stage(stage, ctx)
        for addon in self.addons:
            addon.after_stage(stage, ctx)

    @contextlib.contextmanager
    def route(self, task_index):
        with self.method.route(task_index):
            yield

    @contextlib.contextmanager
    def batch_route(self, task_ids):
        with self.method.batch_route(task_ids):
            yield

    def answer_state(self, task_index):
        # an add-on that trains (GeRe, replay) changes only what the method trains, which the method declares
        return self.method.answer_state(task_index)

    @property
    def adapters_only(self):
        return self.method.adapters_only

    @property
    def fsdp_ready(self):
        return self.method.fsdp_ready and all(a.fsdp_ready for a in self.addons)

    @property
    def has_locator(self):
        return self.method.has_locator

    @property
    def locator_kinds(self):
        return self.method.locator_kinds

    @property
    def locator_kind(self):
        return self.method.locator_kind

    def locate(self, ctx, key, prompt_ids, kind=None):
        return self.method.locate(ctx, key, prompt_ids, kind)

    def locate_new(self, ctx, examples):
        return self.method.locate_new(ctx, examples)

    def reload_skip(self, changed):
        return self.method.reload_skip(changed)

    def refit(self, ctx, changed):
        self.method.refit(ctx, changed)

    def eval_record(self):
        return self.method.eval_record()

    @property
    def export_form(self):
        return self.method.export_form

    @property
    def export_note(self):
        return self.method.export_note

    def export_adapters(self, task_index):
        return self.method.export_adapters(task_index)

    def checkpoint_state(self, model):
        return self.method.checkpoint_state(model)

    def load_checkpoint_state(self, model, state):
        self.method.load_checkpoint_state(model, state)

    def kept_scores(self):
        return self.method.kept_scores()

    def restore_kept_scores(self, kept):
        self.method.restore_kept_scores(kept)

    def stage_metrics(self, stage):
        return self.method.stage_metrics(stage)

    def extra_metrics(self):
        out = dict(self.method.extra_metrics())
        for addon in self.addons:
            out.update(addon.extra_metrics())
        return out
