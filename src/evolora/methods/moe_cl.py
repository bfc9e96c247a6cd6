"""MoE-CL (arXiv 2509.18133; reference code BAI-LAB/MoE-CL): per-task LoRA experts, a shared LoRA expert,
a gate that mixes the two per token, and a task discriminator trained adversarially on the shared expert's
output so that it carries what the tasks share. docs/methods/moe_cl.md compares every choice with the
reference code.

Expert 0 of every targeted projection is the shared expert; expert 1+t (1+2t with shared snapshots) is task
t's. With no options this is the reference form: the FFN runs once with the shared expert's LoRA deltas and
once with the task expert's, and the two outputs are mixed per token by the layer's gate (`Linear(hidden, 2,
bias=False)`, N(0, 0.02), reading the FFN's input, one per layer, trained at every stage). At every layer the
masked token mean of the shared expert's (ungated) FFN output goes through a gradient reversal layer into the
layer's discriminator (a bias-free linear over all tasks of the stream); the loss adds the mean over layers
of its cross-entropy, and the reversal scales the gradient reaching the shared expert by `adversarial_weight`.
The base model and finished tasks' experts are frozen. Inference routes by task id (`route(t)`), given or found by a task locator.

`variant: evolora` names evolora's own combination (VARIANTS below): `proj` mixing (gated deltas summed inside
each projection), one gate per task frozen after it, an MLP discriminator over the tasks seen so far fed
stored prompts of earlier tasks (`memory_per_task`), frozen shared snapshots per task, and reassignment of
answering experts by dev accuracy. Any option given beside it overrides the variant's value.

Shared snapshots (`shared_snapshots`, not in the paper): expert 1+2t is task t's and 2+2t a frozen copy of
the shared expert taken when task t finished; a task that is not the latest reads its copy. Reassignment
(`reassign_examples` > 0, not in the paper): methods/reassign.py."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from evolora.data.prompting import Encoded
from evolora.errors import ConfigError
from evolora.methods.base import Method
from evolora.methods.experts import ExpertModel, GradientReversal, MixedFFN, Route, decoder_layers, pool_recorded
from evolora.methods.locator import LocatorHooks, LocatorOptions
from evolora.methods.reassign import ReassignHooks
from evolora.methods.registry import register


ANSWERER = "moe_cl.answerer"
"""The checkpoint's name for `answerer` (per task: the task whose expert answers it, and whose shared snapshot)."""


EVOLORA_VARIANT = {"mixing": "proj", "gate": "task", "gate_input": "layer", "adversarial_weight": 0.1,
                   "discriminator_hidden": 64, "discriminator_classes": "seen", "memory_per_task": 16,
                   "dropout": 0.0, "shared_snapshots": True, "reassign_examples": 80, "reassign_by": "accuracy"}
"""evolora's MoE-CL variant (with `data.dev_per_label: 16` in the benchmark suites, so reassignment reads dev)."""


@dataclass
class MoECLOptions(LocatorOptions):
    VARIANTS: ClassVar[dict[str, dict]] = {"evolora": EVOLORA_VARIANT}
    variant: Optional[Literal["evolora"]] = None
    """A named bundle of option values (VARIANTS); options given beside it override the bundle."""
    dropout: float = 0.05
    mixing: Literal["ffn", "proj"] = "ffn"
    """ffn: the FFN run with each expert, outputs mixed; proj: gated deltas summed inside each projection."""
    gate: Literal["layer", "task"] = "layer"
    """layer: one gate per layer, trained at every stage; task: one gate per task and layer, frozen after it."""
    gate_input: Literal["ffn", "layer"] = "ffn"
    """ffn: the FFN's input (post-attention norm); layer: the decoder layer's input, RMS-normalised."""
    adversarial_weight: float = 1.0
    """lambda of the gradient reversal; 0 turns the discriminator off."""
    discriminator_layers: Optional[list[int]] = None
    """Decoder layers whose shared output the discriminator sees (negative counts from the end); none = all."""
    discriminator_hidden: int = 0
    """0: one bias-free linear per layer (the reference); N: an MLP with N hidden units."""
    discriminator_classes: Literal["all", "seen"] = "all"
    """The discriminator's softmax over all tasks of the stream, or over the tasks seen so far."""
    discriminator_loss: Literal["logits", "probs"] = "logits"
    """Cross-entropy on the logits; `probs` applies it to softmax probabilities as the reference code does (a
    double softmax: a bounded, weak adversarial term)."""
    memory_per_task: int = 0
    """Prompts of each earlier task kept for the adversarial term; 0 = only the current task (reference)."""
    shared_snapshots: bool = False
    """Each task reads a frozen copy of the shared expert taken when it finished (module docstring)."""
    reassign_examples: int = 0
    """Labelled examples kept per task (dev split first) to choose which expert answers it; 0 = off."""
    reassign_margin: float = 0.1
    """A task moves to another expert only when its score there is lower by more than this fraction."""
    reassign_by: Literal["loss", "accuracy"] = "loss"
    """What reassignment compares on the kept examples: answer loss, or error rate as evaluation scores it."""
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.reassign_examples < 0:
            raise ValueError("reassign_examples: must be >= 0")
        if not 0 <= self.reassign_margin < 1:
            raise ValueError("reassign_margin: must be in [0, 1)")
        if self.adversarial_weight < 0:
            raise ValueError("adversarial_weight: must be >= 0")
        if self.memory_per_task < 0 or self.discriminator_hidden < 0:
            raise ValueError("memory_per_task and discriminator_hidden: must be >= 0")


def _stacked_linear(linears: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """Each layer's linear on its own rows, in one batched product: x [L, B, in] -> [L, B, out]."""
    weight = torch.stack([m.weight for m in linears]).transpose(1, 2)
    if linears[0].bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(torch.stack([m.bias for m in linears]).unsqueeze(1), x, weight)


@register
class MoECL(ReassignHooks, LocatorHooks, Method):
    name = "moe_cl"
    Options = MoECLOptions
    export_note = ("its answer mixes a shared and a task LoRA expert per token through a learned gate (per layer, "
                   "reading the FFN input), which a PEFT LoRA adapter cannot express")

    def setup(self, model, ctx):
        opts = self.options
        self.model = model
        self.num_tasks = len(ctx.tasks)
        self.tasks = ctx.tasks
        if opts.mixing == "ffn":  # wrapped first, so the gate's hook (gate_input: ffn) sees the FFN's input once
            for layer in decoder_layers(model):
                layer.mlp = MixedFFN(layer.mlp)
        self.experts = ExpertModel.install(model, opts, self._weights, gate_input=opts.gate_input)
        n_layers, hidden = len(self.experts.layers), self.experts.hidden_size
        for layer in range(n_layers):
            self.experts.add_expert(layer)  # the shared expert, index 0
        container = nn.Module()
        container.gates = nn.ModuleList([nn.ModuleList() for _ in range(n_layers)])
        chosen = opts.discriminator_layers if opts.discriminator_layers is not None else list(range(n_layers))
        bad = [i for i in chosen if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(f"method.options.discriminator_layers: layer {bad[0]} does not exist "
                              f"(the model has {n_layers})")
        self.disc_layers = sorted({i % n_layers for i in chosen})
        if opts.mixing == "ffn":
            for i, layer in enumerate(decoder_layers(model)):
                layer.mlp.routing = self.experts.routing[i]
            self.record_name, width = "ffn", hidden
        else:
            last = list(self.experts.linears[0].values())[-1]
            self.record_name, width = last.name, last.base.out_features
        container.discriminators = nn.ModuleDict({
            str(i): self._discriminator(width) for i in self.disc_layers} if opts.adversarial_weight > 0 else {})
        model.add_module("moe_cl", container.to(next(model.parameters()).device))
        self.container = container
        self.setup_locator(model, ctx)
        self.current = 0
        self.answerer = torch.arange(self.num_tasks).repeat(2, 1).T.contiguous()
        """Per task at inference: the task whose expert and gate answer it, and (with shared snapshots) the
        task whose shared snapshot does; itself for both unless reassigned."""
        self.reassign_scores: dict[str, dict[str, float]] = {}
        """Per task: each candidate answerer's score on its kept examples (answer loss, or error rate with
        `reassign_by: accuracy`); lower is better."""
        self.reassign_s, self.reassign_reused = 0.0, 0  # seconds and scores kept from earlier stages, last time
        self.fixed_task: Optional[tuple[int, int]] = None
        """(task whose expert and gate, task whose shared snapshot) for every sample while routed."""
        self.sample_tasks: Optional[torch.Tensor] = None
        self.batch_task: Optional[int] = None
        """The task of every sample of the routed batch, when they share one."""
        self._expert_ids: dict = {}
        self.disc_correct = self.disc_total = 0
        return model

    def _discriminator(self, width: int) -> nn.Module:
        """The reference's bias-free linear over the tasks (N(0, 0.02)), or an MLP (`discriminator_hidden`)."""
        hidden = self.options.discriminator_hidden
        if not hidden:
            linear = nn.Linear(width, self.num_tasks, bias=False)
            nn.init.normal_(linear.weight, std=0.02)
            return nn.Sequential(linear)
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, self.num_tasks))

    # --- structure ------------------------------------------------------------------------------
    @property
    def _stride(self) -> int:
        return 2 if self.options.shared_snapshots else 1

    def _expert_of(self, task):
        """Index of task `task`'s expert (an int or a tensor of task ids); its shared snapshot follows it."""
        return 1 + self._stride * task

    def grow(self, stage, ctx):
        device = next(self.model.parameters()).device
        per_task = self.options.gate == "task"
        for layer in range(len(self.experts.layers)):
            while self.experts.num_experts(layer) < 1 + self._stride * (stage + 1):
                # a snapshot slot starts as a copy (no random draw, so the task experts' inits are the paper's)
                snapshot = self.options.shared_snapshots and self.experts.num_experts(layer) % 2 == 0
                self.experts.add_expert(layer, copy_from=0 if snapshot else None)
            gates = self.container.gates[layer]
            while len(gates) < (stage + 1 if per_task else 1):
                if per_task:  # starts at an even mix, with a bias
                    gate = nn.Linear(self.experts.hidden_size, 2)
                    nn.init.zeros_(gate.weight)
                    nn.init.zeros_(gate.bias)
                else:  # the reference: one bias-free gate per layer, N(0, 0.02)
                    gate = nn.Linear(self.experts.hidden_size, 2, bias=False)
                    nn.init.normal_(gate.weight, std=0.02)
                gates.append(gate.to(device))
        self.grow_locator(stage)
        self.current = stage
        self._set_trainable(stage)

    @property
    def tasks_with_experts(self) -> int:
        return (self.experts.num_experts(0) - 1) // self._stride

    def _gate_of(self, task: int) -> int:
        return task if self.options.gate == "task" else 0

    def _set_trainable(self, stage: int) -> None:
        self.model.requires_grad_(False)
        for layer in range(len(self.experts.layers)):
            trained = self.experts.expert_parameters(layer, 0) + \
                self.experts.expert_parameters(layer, self._expert_of(stage))
            for p in trained:
                p.requires_grad_(True)
            self.container.gates[layer][self._gate_of(stage)].requires_grad_(True)
        self.container.discriminators.requires_grad_(True)

    # --- routing --------------------------------------------------------------------------------
    def _weights(self, layer: int, x: torch.Tensor) -> Route:
        """Each sample's shared expert (slot 0: the live one, or at inference its task's snapshot once a later
        task has trained) and task expert (slot 1), weighted per token by the task's gate."""
        routing = self.experts.routing[layer]
        routing.record = self.record_name if (self.model.training and str(layer) in self.container.discriminators) \
            else None
        batch, length = x.shape[:2]
        common = self.batch_task if self.sample_tasks is not None else \
            self.current if self.fixed_task is None else self.fixed_task[0]
        gates = self.container.gates[layer]
        if common is not None:  # one task for the whole batch: its gate alone, experts named without the device
            if common < 0:  # no task known: the shared expert alone
                return Route(torch.zeros(batch, 1, device=x.device, dtype=torch.long),
                             torch.ones(batch, length, 1, device=x.device, dtype=x.dtype), (0,))
            gate = gates[self._gate_of(common)]
            bias = None if gate.bias is None else gate.bias.to(x.dtype)
            g = torch.softmax(F.linear(x, gate.weight.to(x.dtype), bias).float(), -1)
            shared = 0
            if self.options.shared_snapshots and not self.model.training:
                source = common if self.fixed_task is None or self.sample_tasks is not None else self.fixed_task[1]
                shared = self._expert_of(source) + 1 if source < self.current else 0
            experts = (shared, self._expert_of(common))
            key = (experts, batch, x.device)
            if key not in self._expert_ids:  # made once, not per layer: a host-to-GPU copy can wait on the GPU
                if len(self._expert_ids) > 64:
                    self._expert_ids.clear()
                self._expert_ids[key] = torch.tensor(experts, device=x.device).expand(batch, 2)
            return Route(self._expert_ids[key], g, experts)
        tasks = self.sample_tasks.to(x.device)
        if self.options.gate == "task":
            W = torch.stack([g.weight for g in gates])[tasks]  # [B, 2, d]
            b = torch.stack([g.bias for g in gates])[tasks]    # [B, 2]
            g = torch.softmax((torch.einsum("btd,bkd->btk", x, W.to(x.dtype)) + b.unsqueeze(1).to(x.dtype)).float(), -1)
        else:  # one gate for every task
            g = torch.softmax(F.linear(x, gates[0].weight.to(x.dtype)).float(), -1)
        shared = torch.zeros_like(tasks)
        if self.options.shared_snapshots and not self.model.training:
            shared = torch.where(tasks < self.current, self._expert_of(tasks) + 1, shared)
        return Route(torch.stack([shared, self._expert_of(tasks)], dim=1), g)

    def answer_state(self, task_index):
        """What `route(task_index)` answers with (a task without an expert yet: the shared expert alone)."""
        return self.answering_state(tuple(self.answerer[task_index].tolist()) if task_index < self.tasks_with_experts
                                    else None)

    def answering_state(self, answer: Optional[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """What `_use_expert(*answer)` answers with (None: `_use_expert(-1)`): the expert and gate, and the shared
        expert it reads (the live one, or a frozen snapshot), in every layer."""
        experts, gate = (0,), None
        if answer is not None:
            expert, shared_of = answer
            shared = self._expert_of(shared_of) + 1 if self.options.shared_snapshots and shared_of < self.current else 0
            experts, gate = (shared, self._expert_of(expert)), self._gate_of(expert)
        state = {}  # named by slot, not by expert index: a snapshot holds what the live shared expert held
        for layer in range(len(self.experts.layers)):
            for slot, index in enumerate(experts):
                for k, p in enumerate(self.experts.expert_parameters(layer, index)):
                    state[f"{layer}.{slot}.{k}"] = p
            if gate is not None:
                for name, p in self.container.gates[layer][gate].named_parameters():
                    state[f"{layer}.gate.{name}"] = p
        return state

    @contextlib.contextmanager
    def route(self, task_index):
        # a task without an expert yet (FWT) gets the shared expert alone
        known = task_index is not None and task_index < self.tasks_with_experts
        with self._use_expert(*self.answerer[task_index].tolist()) if known else self._use_expert(-1):
            yield

    @contextlib.contextmanager
    def _use_expert(self, task: int, shared_of: Optional[int] = None):
        """Task `task`'s expert and gate (-1: the shared expert alone), whichever task is answered, with the
        shared snapshot of task `shared_of` (default `task`; the live shared expert for the latest task)."""
        previous, self.fixed_task = self.fixed_task, (task, task if shared_of is None else shared_of)
        try:
            yield
        finally:
            self.fixed_task = previous

    @contextlib.contextmanager
    def batch_route(self, task_ids):
        self.sample_tasks = task_ids
        # read from the CPU only (the engine passes the batch's ids from there): reading a GPU tensor would wait
        ids = task_ids.unique().tolist() if task_ids.device.type == "cpu" else []
        self.batch_task = ids[0] if len(ids) == 1 else None
        try:
            yield
        finally:
            self.sample_tasks = self.batch_task = None

    # --- training -------------------------------------------------------------------------------
    def training_examples(self, stage, examples, ctx):
        size = self.options.memory_per_task if self.container.discriminators else 0
        memory = []
        for t in sorted({t for s in range(stage) for t in ctx.stages[s]}):
            task = ctx.tasks[t]
            rng = random.Random(f"moe_cl-memory:{self.options.seed}:{task.name}")
            for i in sorted(rng.sample(range(len(task.train)), min(size, len(task.train)))):
                prompt = ctx.prompts.encode_prompt(task, task.train[i], t).input_ids
                memory.append(Encoded(prompt, len(prompt), t))  # no answer tokens: no LM loss
        self.disc_correct = self.disc_total = 0
        return examples + memory

    def loss_terms(self, step, ctx):
        if not self.container.discriminators:
            return {}
        labels = step.batch.task_ids
        seen = step.stage + 1
        # every chosen layer's discriminator in one batched pass (a loop over 30 layers is 30x the kernel launches)
        mask = step.batch.attention_mask.float()
        mask = mask / mask.sum(1, keepdim=True).clamp(min=1)
        pooled = pool_recorded([self.experts.routing[layer].recorded for layer in self.disc_layers], mask)
        features = GradientReversal.apply(pooled, self.options.adversarial_weight)  # [L, B, D]
        discriminators = [self.container.discriminators[str(layer)] for layer in self.disc_layers]
        logits = _stacked_linear([d[0] for d in discriminators], features)
        if len(discriminators[0]) > 1:  # the MLP form: linear, GELU, linear
            logits = _stacked_linear([d[2] for d in discriminators], F.gelu(logits))
        if self.options.discriminator_classes == "seen":
            logits = logits[..., :seen]  # [L, B, classes]
        self.disc_correct = self.disc_correct + (logits[-1].argmax(-1) == labels).sum()  # read at the stage's end
        self.disc_total += len(labels)
        if self.options.discriminator_loss == "probs":  # the reference code's double softmax, kept on request
            logits = torch.softmax(logits, -1)
        # the mean over layers of each layer's cross-entropy
        return {"adversarial": F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(discriminators)))}

    def after_stage(self, stage, ctx):
        self.experts.clear()
        if self.options.shared_snapshots:
            for layer in range(len(self.experts.layers)):
                self.experts.copy_expert(layer, 0, self._expert_of(stage) + 1)
        self.fit_locator(stage, ctx)
        if self.options.reassign_examples:
            self.reassign(stage, ctx)

    def checkpoint_state(self, model):
        return {**super().checkpoint_state(model), ANSWERER: self.answerer.clone()}

    def load_checkpoint_state(self, model, state):
        state = dict(state)
        answerer = state.pop(ANSWERER, None)
        super().load_checkpoint_state(model, state)
        if answerer is not None:
            answerer = answerer.to(torch.long)
            if answerer.dim() == 1:  # saved before a task could take another task's shared snapshot
                answerer = torch.stack([answerer, answerer], dim=1)
            self.answerer = answerer.clone()

    def stage_metrics(self, stage):
        out = super().stage_metrics(stage)
        if self.disc_total:
            out["discriminator_train_accuracy"] = 100.0 * int(self.disc_correct) / self.disc_total
        if self.options.reassign_examples:
            out["answerer"] = self.answerers()
            out["reassign_scores"] = dict(self.reassign_scores)
            out["reassign_s"], out["reassign_reused"] = self.reassign_s, self.reassign_reused
        return out

    def refit(self, ctx, changed):
        super().refit(ctx, changed)  # the locator, for changed locator options
        if any(name.startswith("reassign") for name in changed) and self.options.reassign_examples:
            self.reassign(len(ctx.stages) - 1, ctx, every_expert=True)

    def eval_record(self):
        if not self.options.reassign_examples:
            return {}
        return {"answerer": self.answerers(), "reassign_by": self.options.reassign_by,
                "reassign_scores": self.reassign_scores}

    def extra_metrics(self):
        out = {"variant": self.options.variant, "mixing": self.options.mixing, "gate": self.options.gate,
               "gate_input": self.options.gate_input, "memory_per_task": self.options.memory_per_task,
               "adversarial_weight": self.options.adversarial_weight}
        if self.options.reassign_examples:
            out["answerer"] = self.answerers()
            out["reassign_by"] = self.options.reassign_by
        return out
