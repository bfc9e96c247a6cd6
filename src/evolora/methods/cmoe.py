"""CMoE for text LLMs (after LLaVA-CMoE, arXiv 2503.21227): experts grow only in the layers that need
them, and a task locator removes the need for a task id at inference.

Probe-guided expansion: before task t (t > 0) every layer gets a temporary probe expert and a probe
router over (its experts + the probe); with all existing experts frozen, the probes train briefly on a
fraction of the task's data with a load-balancing loss. Layer l's probe frequency is the share of tokens
that route to the probe first (top-1); a layer expands when its frequency exceeds mean - alpha * std over the
layers. A new expert starts as a copy of the layer's most-used existing expert (fresh at the first task,
where every layer gets one). The probes are then discarded.

Within-task routing: a router per task and layer over that layer's experts at the time (top-k, softmax
over the kept logits, Switch-style load-balancing loss). Old routers and experts stay frozen; task t
trains its routers and its new experts.

The expansion plan of every task is written to the run folder (cmoe_plan.json) so a reload rebuilds the
same structure before loading the weights."""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from evolora.methods.base import Method
from evolora.methods.experts import ExpertModel
from evolora.methods.locator import Kind, LocatorHooks, LocatorOptions
from evolora.methods.registry import register

PLAN_FILE = "cmoe_plan.json"


@dataclass
class CMoEOptions(LocatorOptions):
    locator: Kind = "vae"
    """The paper's task locator is a per-task VAE (its reconstruction error scores a task); gaussian = PPCA."""
    top_k: int = 2
    expand_alpha: float = 0.5
    """A layer expands when its probe frequency > mean - expand_alpha * std over layers."""
    probe_fraction: float = 0.1
    probe_steps: Optional[int] = None
    """Probe training steps; none = one pass over `probe_fraction` of the task's examples."""
    balance_weight: float = 0.01
    router_init_std: float = 0.02
    new_expert_bias: float = 1.0
    """Initial router bias toward the expert a task adds, so its router starts by using it."""
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.dropout:
            raise ValueError("dropout is not supported by cmoe experts (use 0)")
        if self.top_k < 1 or not 0 < self.probe_fraction <= 1 or self.balance_weight < 0:
            raise ValueError("need top_k >= 1, 0 < probe_fraction <= 1, balance_weight >= 0")


def expansion_decision(frequencies: list[float], alpha: float) -> list[int]:
    """Layers whose probe frequency exceeds mean - alpha * std over the layers (all layers the probe was
    used in, when every layer used it equally)."""
    freq = torch.tensor(frequencies, dtype=torch.float64)
    std = freq.std(unbiased=False).item() if len(freq) > 1 else 0.0
    if std < 1e-9:
        return [i for i, f in enumerate(frequencies) if f > 0]
    threshold = freq.mean().item() - alpha * std
    return [i for i, f in enumerate(frequencies) if f > threshold]


def top_k_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [.., E] weights that are a softmax over the top-k logits and zero elsewhere, and the full
    softmax (for the load-balancing loss)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
    return weights, torch.softmax(logits, dim=-1)


def load_balance(probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss  E * sum_e f_e * P_e  over the non-pad tokens."""
    keep = mask.bool()
    p, dispatched = probs[keep], (weights[keep] > 0).float()
    n_experts = p.shape[-1]
    f = dispatched.mean(0) / dispatched.sum(-1).mean().clamp(min=1)
    return n_experts * (f * p.mean(0)).sum()


@register
class CMoE(LocatorHooks, Method):
    name = "cmoe"
    Options = CMoEOptions
    export_note = ("its answer is a top-k mixture of LoRA experts chosen per token by a router, which a PEFT LoRA "
                   "adapter cannot express")

    def setup(self, model, ctx):
        opts = self.options
        self.model = model
        self.experts = ExpertModel.install(model, opts, self._weights)
        n_layers = len(self.experts.layers)
        container = nn.Module()
        container.routers = nn.ModuleList([nn.ModuleList() for _ in range(n_layers)])
        model.add_module("cmoe", container.to(next(model.parameters()).device))
        self.container = container
        self.setup_locator(model, ctx)
        self.run_dir = ctx.run_dir
        self.plan: dict[int, dict] = self._read_plan()
        self.applied: set[int] = set()
        self.router_task = 0
        self.probing = False
        self.probe_routers: Optional[nn.ModuleList] = None
        self.balance: list[tuple[torch.Tensor, torch.Tensor]] = []
        return model

    # --- the plan -------------------------------------------------------------------------------
    def _read_plan(self) -> dict[int, dict]:
        path = self.run_dir / PLAN_FILE if self.run_dir else None
        if path and path.is_file():
            return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
        return {}

    def _write_plan(self, ctx) -> None:
        if self.run_dir is not None and ctx.accelerator.is_main_process:
            from evolora import atomic

            atomic.write_json(self.run_dir / PLAN_FILE, {str(k): v for k, v in sorted(self.plan.items())})

    def _apply(self, stage: int) -> None:
        """Adds the stage's experts (where the plan expands) and its routers, and sets what trains."""
        device = next(self.model.parameters()).device
        step = self.plan[stage]
        for layer in range(len(self.experts.layers)):
            if layer in step["expanded"]:
                source = step["copied_from"].get(str(layer))
                self.experts.add_expert(layer, copy_from=source)
            router = nn.Linear(self.experts.hidden_size, self.experts.num_experts(layer)).to(device)
            nn.init.normal_(router.weight, std=self.options.router_init_std)
            nn.init.zeros_(router.bias)
            if layer in step["expanded"]:
                with torch.no_grad():
                    router.bias[-1] = self.options.new_expert_bias
            self.container.routers[layer].append(router)
        self.applied.add(stage)
        self.model.requires_grad_(False)
        for layer in range(len(self.experts.layers)):
            self.container.routers[layer][stage].requires_grad_(True)
            if layer in step["expanded"]:
                for p in self.experts.expert_parameters(layer, self.experts.num_experts(layer) - 1):
                    p.requires_grad_(True)
        self.router_task = stage

    def grow(self, stage, ctx):
        self.grow_locator(stage)
        if stage in self.plan and stage not in self.applied:
            self._apply(stage)

    def before_stage(self, stage, ctx):
        if stage in self.applied:
            return
        n_layers = len(self.experts.layers)
        if stage == 0:
            self.plan[0] = {"expanded": list(range(n_layers)), "copied_from": {}, "frequencies": None}
        else:
            frequencies, usage = self._probe(stage, ctx)
            expanded = expansion_decision(frequencies, self.options.expand_alpha)
            self.plan[stage] = {"expanded": expanded, "frequencies": frequencies,
                                "copied_from": {str(layer): int(usage[layer].argmax()) for layer in expanded}}
        self._apply(stage)
        routers = sum(p.numel() for r in self.container.routers for p in r[stage].parameters())
        experts = sum(p.numel() for layer in self.plan[stage]["expanded"]
                      for p in self.experts.expert_parameters(layer, self.experts.num_experts(layer) - 1))
        self.plan[stage]["added_parameters"] = {"experts": experts, "routers": routers}
        self._write_plan(ctx)
        ctx.log(f"cmoe: task {stage + 1} expands {len(self.plan[stage]['expanded'])}/{n_layers} layers "
                f"({experts:,} expert + {routers:,} router parameters)")

    # --- probing --------------------------------------------------------------------------------
    def _probe(self, stage: int, ctx) -> tuple[list[float], list[torch.Tensor]]:
        from evolora.data.batching import collate_train
        from evolora.models import answer_loss

        opts, cfg = self.options, ctx.config.train
        device = next(self.model.parameters()).device
        n_layers = len(self.experts.layers)
        self.model.requires_grad_(False)
        probe_params = []
        self.probe_routers = nn.ModuleList()
        for layer in range(n_layers):
            index = self.experts.add_expert(layer)
            probe_params += self.experts.expert_parameters(layer, index)
            # Near-zero start: which layers end up routing to the probe is decided by training, not by the
            # initial weights (a tiny spread only breaks ties).
            router = nn.Linear(self.experts.hidden_size, index + 1).to(device)
            nn.init.normal_(router.weight, std=1e-3)
            nn.init.zeros_(router.bias)
            self.probe_routers.append(router)
        for p in probe_params + list(self.probe_routers.parameters()):
            p.requires_grad_(True)
        examples = [enc for t in ctx.stages[stage] for enc in ctx.encode_train(t)]
        rng = random.Random(f"cmoe-probe:{opts.seed}:{stage}")
        rng.shuffle(examples)
        examples = examples[: max(cfg.batch_size, math.ceil(opts.probe_fraction * len(examples)))]
        batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
        steps = opts.probe_steps or len(batches)
        optimizer = torch.optim.AdamW(probe_params + list(self.probe_routers.parameters()), lr=cfg.lr)
        pad = ctx.tokenizer.pad_token_id
        self.probing = True
        try:
            self.model.train()
            for step in range(steps):
                batch = collate_train(batches[step % len(batches)], pad).to(ctx.device)
                self.balance = []
                with ctx.accelerator.autocast():
                    out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1)
                    loss = answer_loss(out.logits, batch.labels) + opts.balance_weight * self._balance_loss(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.model.eval()
            hits = torch.zeros(n_layers)
            usage = [torch.zeros(self.experts.num_experts(layer) - 1) for layer in range(n_layers)]
            tokens = 0
            with torch.no_grad(), ctx.accelerator.autocast():
                for chunk in batches:
                    batch = collate_train(chunk, pad).to(ctx.device)
                    self.balance = []
                    self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, logits_to_keep=1)
                    keep = batch.attention_mask.bool()
                    for layer, (_, weights) in enumerate(self.balance):
                        w = weights[keep].float().cpu()
                        hits[layer] += (w.argmax(-1) == w.shape[-1] - 1).sum()
                        usage[layer] += w[:, :-1].sum(0)
                    tokens += int(keep.sum())
        finally:
            self.probing = False
            self.balance = []
            for layer in range(n_layers):
                self.experts.remove_last_expert(layer)
            self.probe_routers = None
            self.model.requires_grad_(False)
        return (hits / max(tokens, 1)).tolist(), usage

    # --- routing --------------------------------------------------------------------------------
    def _weights(self, layer: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.probing:
            router = self.probe_routers[layer]
        else:
            routers = self.container.routers[layer]
            if not len(routers):
                return None
            router = routers[min(self.router_task, len(routers) - 1)]
        logits = x @ router.weight.to(x.dtype).T + router.bias.to(x.dtype)
        weights, probs = top_k_weights(logits.float(), self.options.top_k)
        if self.model.training or self.probing:
            self.balance.append((probs, weights))
        return weights

    @contextlib.contextmanager
    def route(self, task_index):
        previous = self.router_task
        trained = len(self.container.routers[0])
        self.router_task = trained - 1 if task_index is None or task_index >= trained else task_index
        try:
            yield
        finally:
            self.router_task = previous

    @contextlib.contextmanager
    def batch_route(self, task_ids):
        self.balance = []  # collects the router outputs of this forward pass
        yield

    # --- training -------------------------------------------------------------------------------
    def _balance_loss(self, batch) -> torch.Tensor:
        if not self.balance:
            return torch.zeros((), device=batch.input_ids.device)
        mask = batch.attention_mask
        return torch.stack([load_balance(p, w, mask) for p, w in self.balance]).mean()

    def loss_terms(self, step, ctx):
        term = self._balance_loss(step.batch)
        self.balance = []
        return {"balance": self.options.balance_weight * term} if self.options.balance_weight else {}

    def after_stage(self, stage, ctx):
        self.balance = []
        self.experts.clear()
        self.fit_locator(stage, ctx)

    def extra_metrics(self):
        return {
            "expansion": [{"task": stage, "expanded_layers": step["expanded"],
                           "added_parameters": step.get("added_parameters"),
                           "probe_frequencies": step["frequencies"]} for stage, step in sorted(self.plan.items())],
            "experts_per_layer": [self.experts.num_experts(layer) for layer in range(len(self.experts.layers))],
        }
