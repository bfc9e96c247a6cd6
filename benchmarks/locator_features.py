"""Which base-model feature tells the tasks of a stream apart: task-locator accuracy (%) on every task's
test prompts, per hidden-state layer and pooling (last token | mean over the prompt's tokens), for both
density models (gaussian, vae). The locator of each row is fitted exactly as a run fits it: per task, on
`locator_fit_examples` of its train prompts, chosen with the run's seed.

    python benchmarks/locator_features.py [CONFIG] [--layers 4 8 12 16 20 24 28 30] [--fit 200] [--vae]

CONFIG defaults to benchmarks/mtl5_cpu.yaml (the benchmark of record). Features come from one forward pass
per prompt with every layer's hidden states, so the extra layers cost nothing but memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evolora.config import load_config
from evolora.data.prompting import PromptBuilder
from evolora.data.streams import build_stream
from evolora.methods.locator import TaskLocator, fit_indices, prompt_features
from evolora.models import load_model

HERE = Path(__file__).resolve().parent


def accuracy(train: list[torch.Tensor], test: list[torch.Tensor], kind: str, rank: int, seed: int,
             vae_steps: int) -> tuple[float, list[float]]:
    locator = TaskLocator(train[0].shape[1], rank)
    for t, feats in enumerate(train):
        locator.add_task()
        locator.fit(t, feats, seed=seed, vae_steps=vae_steps)
    hits = [(locator.locate(feats, kind) == t).sum().item() for t, feats in enumerate(test)]
    per_task = [100.0 * h / len(feats) for h, feats in zip(hits, test)]
    return 100.0 * sum(hits) / sum(len(f) for f in test), per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(HERE / "mtl5_cpu.yaml"))
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="hidden-state indices (0 = embeddings; default: every 4th layer and the last)")
    parser.add_argument("--fit", type=int, default=200, help="train prompts per task the locator is fitted on")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--vae", action="store_true", help="also fit and score the VAE density model")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    cfg = load_config(args.config)
    tasks = build_stream(cfg.data)
    model, tokenizer, device = load_model(cfg.model)
    model.eval()
    n_layers = model.config.num_hidden_layers
    layers = args.layers or sorted({*range(4, n_layers + 1, 4), n_layers})
    kinds = [(layer, pool) for pool in ("last", "mean") for layer in layers]
    prompts = PromptBuilder(tokenizer, cfg.data.max_input_tokens, cfg.model.chat_template)

    started = time.perf_counter()
    train, test = {k: [] for k in kinds}, {k: [] for k in kinds}
    for t, task in enumerate(tasks):
        for split, examples in ((train, [task.train[i] for i in fit_indices(task, args.fit, cfg.data.seed)]),
                                (test, task.test)):
            ids = [prompts.encode_prompt(task, ex, t).input_ids for ex in examples]
            feats = prompt_features(model, ids, tokenizer.pad_token_id, device, args.batch_size, kinds)
            for kind in kinds:
                split[kind].append(feats[kind])
    print(f"{cfg.model.name} ({n_layers} layers), {len(tasks)} tasks: {', '.join(t.name for t in tasks)}; "
          f"fitted on {args.fit} train prompts per task, scored on {sum(len(t.test) for t in tasks)} test prompts; "
          f"features in {time.perf_counter() - started:.0f}s")
    density = ["gaussian", "vae"] if args.vae else ["gaussian"]
    print("| pool | layer | " + " | ".join(density) + " | " + " | ".join(f"{t.name} ({density[0]})" for t in tasks) + " |")
    print("|---" * (2 + len(density) + len(tasks)) + "|")
    for layer, pool in kinds:
        results = [accuracy(train[(layer, pool)], test[(layer, pool)], kind, args.rank, cfg.train.seed,
                            args.vae_steps) for kind in density]
        print(f"| {pool} | {layer} | " + " | ".join(f"{total:.1f}" for total, _ in results) + " | "
              + " | ".join(f"{a:.1f}" for a in results[0][1]) + " |", flush=True)


if __name__ == "__main__":
    main()
