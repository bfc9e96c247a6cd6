"""Speed of each method relative to a plain PEFT LoRA step of the same rank, measured in one process
(absolute seconds on a shared machine mean little; ratios do), plus the cost of label scoring for a
14-label task relative to a 1-label task, and peak memory (the process's RSS on CPU; on a GPU, the GPU memory
allocated for each method's run).

    python benchmarks/speed.py [--models tiny-llama smollm2-135m] [--methods seq_lora replay ...] [--steps 6]
                               [--stage 2]    (e.g. --stage 15: the last task of a 15-task stream)

A method is named as in the results table, with options after a colon: `moe_cl`, `moe_cl:variant=evolora`,
`seq_lora+gere`, `moe_cl+gere:variant=evolora` (options go to the method; GeRe reads the general texts
of ../shared/data/general when they are there). A trailing `@unfused` runs MoE-CL's FFN mix as two FFN passes
(the form before the fused one), to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from pathlib import Path

import yaml

import torch

from evolora.config import build_config
from evolora.data.batching import collate_train
from evolora.data.tasks import Example, Task
from evolora.engine import StepLog, build_context, train_stage
from evolora.evaluation import score_candidates
from evolora.methods.base import LoraOptions
from evolora.methods.experts import MixedFFN
from evolora.methods.seq_lora import add_lora
from evolora.models import Bf16ProductsInFp32, cpu_has_fast_bf16, emulates_bf16, resolve_device, resolve_dtype

METHODS = ["seq_lora", "seq_ft", "replay", "ewc", "lwf", "olora", "per_task_lora", "moe_cl", "moe_cl:variant=evolora",
           "cmoe", "seq_lora+gere", "seq_ft+gere"]
GENERAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "general" / "replay_1000.jsonl"
DBPEDIA_LABELS = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
                  "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
TEXT = ("The museum opened a new wing last spring, with rooms on river trade, old maps and the ships that carried "
        "grain and timber along the coast for two centuries before the railway came. ") * 4


def synthetic_task(name: str, n: int) -> Task:
    examples = [Example(f"{i}: {TEXT}", "Company") for i in range(n)]
    return Task(name, "What is the topic of the following paragraph? Choose one from the option.\n",
                DBPEDIA_LABELS, examples, examples[:16])


@contextlib.contextmanager
def fusion(spec: str):
    """While inside, MoE-CL's FFN mix is fused unless `spec` ends with `@unfused`."""
    previous, MixedFFN.FUSE = MixedFFN.FUSE, not spec.endswith("@unfused")
    try:
        yield
    finally:
        MixedFFN.FUSE = previous


def method_section(spec: str) -> dict:
    """`name[+addon...][:key=value,...][@unfused]` -> the config's method section."""
    names, _, opts = spec.removesuffix("@unfused").partition(":")
    method, *addons = names.split("+")
    options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in opts.split(",") if item)}
    # GeRe's step cost does not depend on how many general texts it holds: 64 keep its setup short.
    gere = {"texts": str(GENERAL), "num_texts": 64} if GENERAL.is_file() else {"num_texts": 16}
    return {"name": method, "options": options, "addons": {a: (gere if a == "gere" else {}) for a in addons}}


def config(model: str, method: str, batch: int):
    return build_config({
        "model": {"name": model, "dtype": "fp32" if model == "tiny-llama" else "auto"},
        "data": {"stream": "demo", "max_input_tokens": 192},
        "method": method_section(method),
        "train": {"batch_size": batch, "lr": 1e-4, "checkpoint_every": 0},
        "eval": {"batch_size": 16},
    })


def peak_mb() -> float:
    """Peak GPU memory allocated when on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_peft(model_name: str, batch: int, steps: int, dropout: float = 0.0):
    """A plain PEFT LoRA model (rank 8, LoRA dropout `dropout`) on the base model and `steps` batches of the
    synthetic task, each with HF-style labels (the prompt masked to -100): (model, [(batch, labels), ...])."""
    ctx, _ = build_context(config(model_name, "seq_ft", batch), None)
    model = add_lora(ctx.model, LoraOptions(dropout=dropout))
    task = synthetic_task("t", batch * steps)
    items = [ctx.prompts.encode_train(task, ex, 0) for ex in task.train]
    batches = []
    for step in range(steps):
        b = collate_train(items[step * batch:(step + 1) * batch], ctx.tokenizer.pad_token_id).to(ctx.device)
        labels = b.input_ids.clone()
        labels[:, : b.input_ids.shape[1] - b.labels.shape[1]] = -100
        labels[:, -b.labels.shape[1]:] = b.labels
        batches.append((b, labels))
    return model, batches


def plain_peft_loss(model, b, labels) -> torch.Tensor:
    """A plain PEFT script's forward: full logits, HF's own loss, autocast to the model's dtype."""
    dtype = next(model.parameters()).dtype
    with torch.autocast(b.input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss


def plain_peft_tokens_per_s(model_name: str, batch: int, steps: int) -> float:
    """A plain PEFT script's step: full logits, HF's own loss, AdamW."""
    model, batches = plain_peft(model_name, batch, steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, tokens = [], 0
    for step, (b, labels) in enumerate(batches):
        start = time.perf_counter()
        loss = plain_peft_loss(model, b, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()  # waits for the device, as the engine's step does when it logs the loss
        if step:  # the first step warms up kernels
            times.append(time.perf_counter() - start)
            tokens += b.n_tokens
    return tokens / sum(times)


def last_stage(model_name: str, method_name: str, batch: int, steps: int, stage: int = 2):
    """The method set up for stage `stage` (1-based; from the second on, penalties, replay and the experts of
    earlier tasks apply) after two training steps on each earlier stage: (ctx, method, stage index, examples)."""
    tasks = [synthetic_task(f"t{i}", batch * 2) for i in range(stage - 1)] + [synthetic_task("last", batch * steps)]
    ctx, method = build_context(config(model_name, method_name, batch), None,
                                before_setup=lambda c: setattr(c, "tasks", tasks))  # methods size for the stream
    ctx.stages = method.stages(stage)
    last = stage - 1
    if len(ctx.stages) == 1:  # joint methods: one stage with everything
        method.grow(0, ctx)
        return ctx, method, 0, ctx.encode_train(last)
    for s in range(last):
        method.grow(s, ctx)
        method.before_stage(s, ctx)
        train_stage(ctx, method, s, method.training_examples(s, ctx.encode_train(s), ctx), StepLog(None), 0)
        method.after_stage(s, ctx)
    method.grow(last, ctx)
    method.before_stage(last, ctx)
    return ctx, method, last, method.training_examples(last, ctx.encode_train(last), ctx)


def method_tokens_per_s(model_name: str, method_name: str, batch: int, steps: int, stage: int = 2) -> float:
    """The engine's step for the method in stage `stage` (see `last_stage`)."""
    ctx, method, index, examples = last_stage(model_name, method_name, batch, steps, stage)
    return train_stage(ctx, method, index, examples, StepLog(None), 0)["tokens_per_s"]


def scoring_ratio(model_name: str) -> float:
    ctx, _ = build_context(config(model_name, "seq_lora", 8), None)
    task = synthetic_task("t", 32)
    prompts = [ctx.prompts.encode_prompt(task, ex, 0).input_ids for ex in task.train]
    many = [ctx.prompts.answer_ids(label) for label in DBPEDIA_LABELS]
    times = {}
    with ctx.accelerator.autocast():
        for name, candidates in (("one", many[:1]), ("fourteen", many), ("one", many[:1]), ("fourteen", many)):
            start = time.perf_counter()
            score_candidates(ctx.model, prompts, candidates, ctx.tokenizer.pad_token_id, ctx.device, 16)
            times[name] = time.perf_counter() - start  # second pass of each kept (warm)
    return times["fourteen"] / times["one"]


def matmul_gflops(dtype: torch.dtype, device: torch.device) -> float:
    """One FFN-sized matrix product (2048 x 576 by 576 x 1536) in this dtype: GFLOP/s with the current threads."""
    a = torch.randn(2048, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    a @ b
    repeats = 3
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()  # waits for a GPU
    return repeats * 2 * 2048 * 576 * 1536 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2,
                        help="measure in this stage of the stream (expert methods hold stage+1 experts per layer)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = resolve_device("auto")
    fast = f" (fast bf16 instructions: {cpu_has_fast_bf16()})" if device.type == "cpu" else ""
    emulated = ""
    if emulates_bf16(torch.bfloat16, device):
        with Bf16ProductsInFp32():
            emulated = f", bf16 as fp32 products (what a bf16 run uses here) {matmul_gflops(torch.bfloat16, device):.1f}"
    print(f"matrix product, GFLOP/s: fp32 {matmul_gflops(torch.float32, device):.1f}, "
          f"bf16 {matmul_gflops(torch.bfloat16, device):.1f}{emulated}{fast}")
    for model_name in args.models:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, threads {torch.get_num_threads()}"
        dtype = "fp32" if model_name == "tiny-llama" else str(resolve_dtype("auto", device)).removeprefix("torch.")
        print(f"\n== {model_name} ({where}, {dtype}), stage {args.stage} ==")
        reference = plain_peft_tokens_per_s(model_name, args.batch, args.steps)
        print(f"plain PEFT LoRA step: {reference:.0f} tokens/s (reference = 1.00)")
        print(f"{'method':>16}  tokens/s  step time / PEFT step  peak MB ({'GPU' if torch.cuda.is_available() else 'RSS'})")
        for method_name in args.methods:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with fusion(method_name):
                tps = method_tokens_per_s(model_name, method_name, args.batch, args.steps, args.stage)
            print(f"{method_name:>16}  {tps:8.0f}  {reference / tps:21.2f}  {peak_mb():11.0f}")
        print(f"label scoring, 14-label task / 1-label task: {scoring_ratio(model_name):.2f}x the time")


if __name__ == "__main__":
    main()
