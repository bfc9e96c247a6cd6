"""GeRe: general-sample replay with the threshold-margin (TM) loss (Zhang et al., arXiv 2508.04676).

Before the first task the base model reads ~1,000 general texts; per hidden dimension j of the chosen
layer, over all their tokens: thresholds tau+ = mu_j + k*sigma_j and tau- = mu_j - k*sigma_j. Every
(token, dim) entry of the base model's hidden states is then *positive* (h0 >= tau+), *negative*
(h0 <= tau-) or *neutral*. Only these states are kept, 2 bits an entry (16x smaller than fp32 hidden
states), plus the thresholds. While training any method, each step also runs a few general texts: their
LM cross-entropy plus w * TM, where TM penalises hidden states that leave their state's region:
    positive: relu(tau+ - h)     negative: relu(h - tau-)     neutral: relu(h - tau+) + relu(tau- - h)
averaged over the violated entries. w is fixed or dynamic (w = CE / TM, detached, so both weigh alike).

With no options this is the reference code's form (Qznan/GeRe, `w_strategy='dy'`, the setting its README reports):
the step's loss is the average of the task CE and the general CE, plus w * TM with w = that average / TM;
the general texts are mixed in proportion to the stage's data (all of them once per stage, where the
reference concatenates them into the stage's dataset). docs/methods/gere.md lists every difference.

Ablations on the same plumbing (`loss`): `ce` (plain replay), `kl` (KL to the base model's logits,
with temperature, from a frozen copy of the base model), `l1` / `l2` (distance to the stored bf16 hidden
states). `balance: sum` adds the general CE to the task CE instead of averaging the two (under gradient
clipping the two are not equivalent); `general_weight` scales the whole general part."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from evolora.data.batching import right_pad
from evolora.methods.addons import AddOn
from evolora.methods.registry import register_addon

NEUTRAL, POSITIVE, NEGATIVE = 0, 1, 2


@dataclass
class GeReOptions:
    texts: Optional[str] = None
    """JSONL of general texts (`text` field); none: texts are sampled once from the base model and cached."""
    num_texts: int = 1000
    max_tokens: int = 128
    per_batch: int = 2
    """General texts run with every training step (mixing `per_batch`)."""
    mixing: Literal["proportional", "per_batch"] = "proportional"
    """`proportional`: as many per step as it takes to pass over all general texts once per stage."""
    balance: Literal["average", "sum"] = "average"
    """average: (task CE + general CE) / 2, as the reference; sum: task CE + general CE."""
    loss: Literal["tm", "ce", "kl", "l1", "l2"] = "tm"
    k: float = 1.0
    """Threshold width in standard deviations."""
    weight: Optional[float] = None
    """Weight of the TM/KL/L1/L2 term; none = dynamic (CE / term, detached)."""
    general_weight: float = 1.0
    """Scale of the whole general part (its CE and the term) against the task loss; 1 = the paper's balance."""
    layer: int = -1
    """Index into the model's hidden states; -1 is the final (normed) state fed to the LM head."""
    temperature: float = 2.0
    """KL ablation only."""
    seed: int = 0

    def __post_init__(self):
        if self.num_texts < 1 or self.max_tokens < 8 or self.per_batch < 1:
            raise ValueError("need num_texts >= 1, max_tokens >= 8, per_batch >= 1")
        if self.k <= 0 or self.temperature <= 0:
            raise ValueError("k and temperature must be > 0")
        if self.general_weight <= 0:
            raise ValueError("general_weight must be > 0")
        if self.weight is not None and self.weight < 0:
            raise ValueError("weight must be >= 0 (or null for dynamic)")


# --- the math -------------------------------------------------------------------------------------

def thresholds(hidden: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """tau+ and tau- per dimension from hidden states [N, D] of all (non-pad) tokens."""
    hidden = hidden.double()
    mean, std = hidden.mean(0), hidden.std(0, unbiased=False)
    return (mean + k * std).float(), (mean - k * std).float()


def classify(hidden: torch.Tensor, tau_pos: torch.Tensor, tau_neg: torch.Tensor) -> torch.Tensor:
    """The state of every entry of [N, D]: POSITIVE, NEGATIVE or NEUTRAL (uint8)."""
    hidden = hidden.float()
    states = torch.full(hidden.shape, NEUTRAL, dtype=torch.uint8)
    states[hidden >= tau_pos] = POSITIVE
    states[hidden <= tau_neg] = NEGATIVE
    return states


def pack_states(states: torch.Tensor) -> torch.Tensor:
    """[N, D] 2-bit states -> [N, ceil(D/4)] bytes."""
    n, d = states.shape
    padded = torch.zeros(n, 4 * math.ceil(d / 4), dtype=torch.uint8)
    padded[:, :d] = states
    quads = padded.view(n, -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_states(packed: torch.Tensor, dim: int) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 3).reshape(packed.shape[0], -1)[:, :dim]


def tm_loss(hidden: torch.Tensor, states: torch.Tensor, tau_pos: torch.Tensor, tau_neg: torch.Tensor) -> torch.Tensor:
    """Threshold-margin loss of hidden states [N, D] against their reference states [N, D], averaged over
    the entries that violate their region (zero when every entry is inside it)."""
    h = hidden.float()
    violation = torch.where(states == POSITIVE, F.relu(tau_pos - h),
                            torch.where(states == NEGATIVE, F.relu(h - tau_neg),
                                        F.relu(h - tau_pos) + F.relu(tau_neg - h)))
    violated = (violation > 0).sum()
    return violation.sum() / violated.clamp(min=1)


# --- general texts ----------------------------------------------------------------------------------

NEUTRAL_PROMPTS = ["The", "In", "A", "It is", "One of the", "This", "When", "There are", "Many", "After the",
                   "According to", "During", "Most", "Some"]


@torch.no_grad()
def synthesize_texts(model, tokenizer, n: int, max_tokens: int, seed: int, device, batch_size: int = 16) -> list[str]:
    """Samples up to n distinct texts from the base model, each started from a neutral prompt."""
    from evolora.data.batching import left_pad

    texts, seen = [], set()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attempt = 0
        while len(texts) < n and attempt < 3 * n:
            prompts = [NEUTRAL_PROMPTS[(attempt + i) % len(NEUTRAL_PROMPTS)] for i in range(batch_size)]
            attempt += batch_size
            encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
            ids, mask, _ = (t.to(device) for t in left_pad(encoded, pad))
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.95, temperature=1.0,
                                 max_new_tokens=max_tokens, pad_token_id=pad)
            for row, prompt in enumerate(prompts):
                text = " ".join((prompt + tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)).split())
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
    return texts[:n]


def general_texts(options: GeReOptions, model, ctx) -> list[str]:
    from evolora import atomic
    from evolora.data.general import read_texts
    from evolora.models import cache_dir

    if options.texts:
        return read_texts(options.texts, options.num_texts)
    key = json.dumps({"model": ctx.config.model.model_dump(), "n": options.num_texts,
                      "max_tokens": options.max_tokens, "seed": options.seed}, sort_keys=True)
    path = cache_dir() / "general_synth" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"
    if path.is_file():
        return read_texts(path)
    ctx.log(f"gere: sampling {options.num_texts} general texts from the base model (cached in {path})")
    with ctx.accelerator.autocast():
        texts = synthesize_texts(model, ctx.tokenizer, options.num_texts, options.max_tokens, options.seed, ctx.device)
    atomic.write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


# --- the add-on -------------------------------------------------------------------------------------

def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """Mean token cross-entropy of logits [N, T, V] (any dtype, computed in fp32) against targets [N, T]
    (-100: ignored), `rows` sequences at a time, each chunk recomputed in the backward pass: the fp32 copy and
    the log-softmax of only one chunk are alive at a time (a step of GeRe's proportional mixing scores dozens
    of general texts over a 49k vocabulary, gigabytes in fp32). The same value as one cross-entropy."""
    from torch.utils.checkpoint import checkpoint

    def summed(chunk, target):
        chunk = chunk.to(torch.promote_types(chunk.dtype, torch.float32))  # bf16 logits: fp32, as before
        return F.cross_entropy(chunk.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")

    total = sum(checkpoint(summed, logits[i:i + rows], targets[i:i + rows], use_reentrant=False)
                for i in range(0, len(logits), rows))
    return total / (targets != -100).sum().clamp(min=1)


@register_addon
class GeRe(AddOn):
    name = "gere"
    Options = GeReOptions

    def setup(self, base_model, ctx):
        from evolora.data.general import encode_texts

        opts = self.options
        texts = general_texts(opts, base_model, ctx)
        self.sequences = encode_texts(ctx.tokenizer, texts, opts.max_tokens)
        lengths = torch.tensor([len(s) for s in self.sequences])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.pad_id = ctx.tokenizer.pad_token_id
        self.teacher = None
        if opts.loss == "kl":  # the base model itself, kept frozen beside the one being trained
            self.teacher = copy.deepcopy(base_model).eval().requires_grad_(False)
        elif opts.loss in ("tm", "l1", "l2"):
            hidden = self._base_hidden(base_model, ctx)
            if opts.loss == "tm":
                self.tau_pos, self.tau_neg = thresholds(hidden, opts.k)
                self.states = pack_states(classify(hidden, self.tau_pos, self.tau_neg))
                self.dim = hidden.shape[1]
                self.hidden_bytes = hidden.numel() * 4  # as fp32, what the reference implementation keeps
            else:
                self.reference = hidden.to(torch.bfloat16)
        self.order: list[int] = []
        self.per_step = opts.per_batch

    @torch.no_grad()
    def _base_hidden(self, model, ctx) -> torch.Tensor:
        """The base model's hidden states at the chosen layer for every non-pad token, in sequence order."""
        model.eval()
        rows = []
        size = ctx.config.eval.batch_size
        for start in range(0, len(self.sequences), size):
            ids, mask = right_pad(self.sequences[start:start + size], self.pad_id, ctx.device)
            with ctx.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            rows.append(out.hidden_states[self.options.layer][mask.bool()].float().cpu())
        return torch.cat(rows)

    def stored_bytes(self) -> int:
        return self.states.numel() if self.options.loss == "tm" else 0

    def training_examples(self, stage, examples, ctx):
        if self.options.mixing == "proportional":
            steps = max(1, round(math.ceil(len(examples) / ctx.config.train.batch_size) * ctx.config.train.epochs))
            self.per_step = math.ceil(len(self.sequences) / steps)
        self.rng = random.Random(f"gere:{self.options.seed}:{stage}")
        self.order = []
        return examples

    def _next_indices(self) -> list[int]:
        picked = []
        while len(picked) < self.per_step:
            if not self.order:
                self.order = list(range(len(self.sequences)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked

    def _rows(self, table: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return torch.cat([table[self.offsets[i]:self.offsets[i + 1]] for i in indices])

    def loss_terms(self, step, ctx):
        opts = self.options
        indices = self._next_indices()
        ids, mask = right_pad([self.sequences[i] for i in indices], self.pad_id, ctx.device)
        out = step.model(input_ids=ids, attention_mask=mask, output_hidden_states=opts.loss in ("tm", "l1", "l2"))
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        general_ce = chunked_cross_entropy(out.logits[:, :-1], targets)
        # the engine adds the terms to the task CE; `average` halves both CEs (the task's through a negative term)
        half = opts.balance == "average"
        terms = {"general_ce": opts.general_weight * general_ce * (0.5 if half else 1.0)}
        if half:
            terms["task_ce_halved"] = -0.5 * step.task_loss
        ce = (step.task_loss + general_ce) * (0.5 if half else 1.0)
        if opts.loss == "ce":
            return terms
        if opts.loss == "kl":
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            t = opts.temperature
            logits = out.logits[:, :-1].float()
            per_token = F.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(teacher / t, -1),
                                 log_target=True, reduction="none").sum(-1)
            keep = mask[:, 1:].float()
            extra = (per_token * keep).sum() / keep.sum() * t * t
        else:
            hidden = out.hidden_states[opts.layer][mask.bool()].float()
            if opts.loss == "tm":
                states = unpack_states(self._rows(self.states, indices).to(ctx.device), self.dim)
                extra = tm_loss(hidden, states, self.tau_pos.to(ctx.device), self.tau_neg.to(ctx.device))
            else:
                diff = hidden - self._rows(self.reference, indices).to(ctx.device).float()
                extra = diff.abs().mean() if opts.loss == "l1" else diff.pow(2).mean()
        if opts.weight is not None:
            weight = opts.weight
        else:
            weight = ce.detach() / extra.detach().clamp(min=1e-8) if extra.item() > 0 else 0.0
        terms[f"general_{opts.loss}"] = opts.general_weight * weight * extra
        return terms

    def extra_metrics(self):
        out = {"gere_loss": self.options.loss, "gere_texts": len(self.sequences), "gere_per_step": self.per_step}
        if self.options.loss == "tm":
            out["gere_state_bytes"] = self.stored_bytes()
            out["gere_hidden_fp32_bytes"] = self.hidden_bytes
        return out
