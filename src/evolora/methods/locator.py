"""Task locator (after LLaVA-CMoE's probabilistic task locator, arXiv 2503.21227): which task does an
input belong to, so expert methods need no task id at inference.

The feature of an input is the frozen base model's hidden state at one layer (default two-thirds of the
depth), averaged over the prompt's tokens (or the last token's). After each task, a density model of that
task's train features is fitted; an input's score under task t is z-scored with t's own training scores
(so tasks of different spread compare), and the lowest z wins. Two density models:
  gaussian  probabilistic PCA: Mahalanobis distance in the top-k principal directions plus the residual
            over the mean remaining variance (k*d + d numbers a task instead of a full d x d covariance)
  vae       the paper's form: a small VAE per task on standardised features; score = reconstruction error
Both are fitted on every task, so one run measures both; `kind` picks the one used for routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from evolora.methods.base import LoraOptions

Kind = Literal["gaussian", "vae"]


@dataclass
class LocatorOptions(LoraOptions):
    locator: Kind = "gaussian"
    """The density model that routes in `locate` mode (both are fitted and measured)."""
    locator_layer: Optional[int] = None
    """Hidden-state index of the base model's feature (0 = embeddings, -1 = the final normed state);
    None = two-thirds of the depth, where tasks separate best on SmolLM2 (benchmarks/locator_features.py)."""
    locator_pool: Literal["last", "mean"] = "mean"
    """The feature of a prompt: the mean of its tokens' hidden states, or its last token's."""
    locator_rank: int = 16
    locator_fit_examples: int = 200
    """Train prompts per task the locator is fitted on."""
    locator_vae_steps: int = 300

    def __post_init__(self):
        super().__post_init__()
        if self.locator_rank < 1 or self.locator_fit_examples < 2 or self.locator_vae_steps < 1:
            raise ValueError("need locator_rank >= 1, locator_fit_examples >= 2, locator_vae_steps >= 1")
        if self.locator_pool not in ("last", "mean"):
            raise ValueError(f"locator_pool must be 'last' or 'mean', not {self.locator_pool!r}")


def _frozen(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class GaussianDensity(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.mean, self.basis, self.variances = _frozen(dim), _frozen(dim, rank), _frozen(rank)
        self.residual_variance, self.score_mean, self.score_std = _frozen(1), _frozen(1), _frozen(1)

    def fit(self, x: torch.Tensor) -> None:
        x = x.double()
        mean = x.mean(0)
        centered = x - mean
        cov = centered.T @ centered / max(1, len(x) - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals = eigvals.clamp(min=0).flip(0)
        eigvecs = eigvecs.flip(1)
        k = self.basis.shape[1]
        rest = eigvals[k:]
        floor = 1e-6 * eigvals[0].clamp(min=1e-12)
        residual = (rest.mean() if len(rest) else torch.tensor(0.0, dtype=x.dtype)).clamp(min=floor)
        with torch.no_grad():
            self.mean.copy_(mean.float())
            self.basis.copy_(eigvecs[:, :k].float())
            self.variances.copy_(eigvals[:k].clamp(min=residual).float())
            self.residual_variance.fill_(float(residual))
            scores = self.raw_score(x.float())
            self.score_mean.fill_(float(scores.mean()))
            self.score_std.fill_(float(scores.std().clamp(min=1e-6)))

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        centered = x.float() - self.mean
        proj = centered @ self.basis
        residual = (centered.pow(2).sum(-1) - proj.pow(2).sum(-1)).clamp(min=0)
        return (proj.pow(2) / self.variances).sum(-1) + residual / self.residual_variance

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw_score(x) - self.score_mean) / self.score_std


class VAEDensity(nn.Module):
    def __init__(self, dim: int, hidden: int = 64, latent: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.feature_mean, self.feature_std = _frozen(dim), _frozen(dim)
        self.score_mean, self.score_std = _frozen(1), _frozen(1)
        self.requires_grad_(False)

    def _reconstruct(self, z_in: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(z_in).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return self.decoder(z), mu, logvar

    def fit(self, x: torch.Tensor, steps: int = 300, lr: float = 3e-3, beta: float = 1e-3, seed: int = 0) -> None:
        x = x.float()
        with torch.no_grad():
            self.feature_mean.copy_(x.mean(0))
            self.feature_std.copy_(x.std(0).clamp(min=1e-4))
        z_in = (x - self.feature_mean) / self.feature_std
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            for _ in range(steps):
                recon, mu, logvar = self._reconstruct(z_in, sample=True)
                kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
                loss = F.mse_loss(recon, z_in, reduction="none").sum(-1).mean() + beta * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.requires_grad_(False)
        with torch.no_grad():
            scores = self.raw_score(x)
            self.score_mean.fill_(float(scores.mean()))
            self.score_std.fill_(float(scores.std().clamp(min=1e-6)))

    @torch.no_grad()
    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        z_in = (x.float() - self.feature_mean) / self.feature_std
        recon, _, _ = self._reconstruct(z_in, sample=False)
        return (recon - z_in).pow(2).mean(-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw_score(x) - self.score_mean) / self.score_std


class TaskLocator(nn.Module):
    """One Gaussian and one VAE density per task, over base-model features of dimension `dim`."""

    def __init__(self, dim: int, rank: int = 16, vae_hidden: int = 64, vae_latent: int = 16):
        super().__init__()
        self.dim, self.rank, self.vae_hidden, self.vae_latent = dim, rank, vae_hidden, vae_latent
        self.gaussian = nn.ModuleList()
        self.vae = nn.ModuleList()

    def __len__(self) -> int:
        return len(self.gaussian)

    def add_task(self) -> None:
        self.gaussian.append(GaussianDensity(self.dim, self.rank))
        self.vae.append(VAEDensity(self.dim, self.vae_hidden, self.vae_latent))

    def fit(self, task: int, features: torch.Tensor, seed: int = 0, vae_steps: int = 300) -> None:
        self.gaussian[task].fit(features)
        self.vae[task].fit(features, steps=vae_steps, seed=seed + task)

    @torch.no_grad()
    def scores(self, features: torch.Tensor, kind: Kind) -> torch.Tensor:
        """[N, tasks] z-scored density scores (lower = more likely that task), always in fp32 (an
        enclosing bf16 autocast would otherwise change close calls)."""
        models = self.gaussian if kind == "gaussian" else self.vae
        with torch.autocast(features.device.type, enabled=False):
            return torch.stack([m.score(features.float()) for m in models], dim=-1)

    def locate(self, features: torch.Tensor, kind: Kind) -> torch.Tensor:
        return self.scores(features, kind).argmin(-1)

    @torch.no_grad()
    def score_task(self, task: int, features: torch.Tensor, kind: Kind) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return (self.gaussian if kind == "gaussian" else self.vae)[task].score(features.float())


LOCATOR_MODULE = "task_locator"
"""The locator's name in the model (its tensors are saved under `task_locator.`)."""


def fit_indices(task, n: int, seed: int) -> list[int]:
    """Which of a task's train examples its locator is fitted on: n of them, the same for every run of a seed."""
    import random

    rng = random.Random(f"locator:{seed}:{task.name}")
    return sorted(rng.sample(range(len(task.train)), min(n, len(task.train))))


@torch.no_grad()
def prompt_features(model, prompt_ids: list[list[int]], pad_id: int, device, batch_size: int,
                    kinds: list[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """Per (hidden-state index, 'last'|'mean'): each prompt's feature, [N, d] in fp32 on the CPU. Prompts
    are batched by length with left padding; 'mean' averages over the prompt's own tokens only."""
    from evolora.data.batching import left_pad

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = {kind: torch.empty(len(prompt_ids), model.config.hidden_size) for kind in kinds}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, positions = (t.to(device) for t in left_pad([prompt_ids[i] for i in idx], pad_id))
        hidden_states = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              output_hidden_states=True, logits_to_keep=1).hidden_states
        weights = mask.unsqueeze(-1).float()
        for layer, pool in kinds:
            hidden = hidden_states[layer].float()
            pooled = (hidden * weights).sum(1) / weights.sum(1) if pool == "mean" else hidden[:, -1]
            out[(layer, pool)][idx] = pooled.cpu()
    return out


class LocatorHooks:
    """For expert methods (mixed into the Method): a task locator fitted after every task from base-model
    features of that task's train prompts, and `locate()` for task-id-free inference. The method provides
    `self.experts` (an ExpertModel) and options `locator` ('gaussian'|'vae'), `locator_layer`,
    `locator_rank`, `locator_fit_examples`."""

    has_locator = True
    locator_kinds = ("gaussian", "vae")

    @property
    def locator_kind(self) -> str:
        return self.options.locator

    def setup_locator(self, model, ctx) -> None:
        from evolora.errors import ConfigError

        n_layers = model.config.num_hidden_layers
        layer = self.options.locator_layer
        if layer is None:
            layer = round(2 * n_layers / 3)
        elif not -(n_layers + 1) <= layer <= n_layers:
            raise ConfigError(f"method.options.locator_layer: {layer} is out of range for a model with {n_layers} "
                              f"layers (0..{n_layers}, or negative from the end)")
        self.locator_layer = layer
        self.locator = TaskLocator(model.config.hidden_size, self.options.locator_rank)
        model.add_module(LOCATOR_MODULE, self.locator)
        self._feature_cache: dict = {}
        self.locator_fit_s = 0.0

    def grow_locator(self, stage: int) -> None:
        while len(self.locator) < stage + 1:
            self.locator.add_task()

    def features(self, ctx, prompt_ids: list[list[int]]) -> torch.Tensor:
        """The frozen base model's feature of each prompt (per `locator_layer`, `locator_pool`), experts
        off: [N, d]."""
        ctx.model.eval()
        key = (self.locator_layer, self.options.locator_pool)
        with self.experts.disabled(), ctx.accelerator.autocast():
            return prompt_features(ctx.model, prompt_ids, ctx.tokenizer.pad_token_id, ctx.device,
                                   ctx.config.eval.batch_size, [key])[key]

    def fit_locator(self, stage: int, ctx) -> None:
        import time

        started = time.perf_counter()
        for t in ctx.stages[stage]:
            task = ctx.tasks[t]
            chosen = fit_indices(task, self.options.locator_fit_examples, ctx.config.data.seed)
            prompts = [ctx.prompts.encode_prompt(task, task.train[i], t).input_ids for i in chosen]
            self.locator.fit(t, self.features(ctx, prompts), seed=ctx.config.train.seed,
                             vae_steps=self.options.locator_vae_steps)
        self.locator_fit_s = time.perf_counter() - started

    def stage_metrics(self, stage: int) -> dict:
        return {"locator_fit_s": self.locator_fit_s}

    def locate(self, ctx, key, prompt_ids: list[list[int]], kind: str | None = None) -> list[int]:
        """Located task of each prompt; base-model features are cached under `key` (they never change)."""
        if key not in self._feature_cache:
            self._feature_cache[key] = self.features(ctx, prompt_ids)
        return self.locator.locate(self._feature_cache[key], kind or self.options.locator).tolist()

    def locate_new(self, ctx, examples) -> list[int]:
        """Each new input framed as every task frames it (its instruction unless the input brings one, its
        answer options), scored by that task's density model; the task with the lowest z-score."""
        scores = torch.stack([
            self.locator.score_task(t, self.features(ctx, [ctx.prompts.encode_prompt(ctx.tasks[t], ex, t).input_ids
                                                           for ex in examples]), self.options.locator)
            for t in range(len(ctx.tasks))], dim=-1)
        return scores.argmin(-1).tolist()

    def reload_skip(self, changed: set[str]) -> str | None:
        """New locator options: the saved density models no longer apply (refit rebuilds them)."""
        return LOCATOR_MODULE if any(name.startswith("locator") for name in changed) else None

    def refit(self, ctx, changed: set[str]) -> None:
        """Refits the locator with new options: its features come from the frozen base model and each task's
        train inputs, so a refit after the run gives what fitting during the run would have."""
        if self.reload_skip(changed):
            for stage in range(len(ctx.stages)):
                self.fit_locator(stage, ctx)
