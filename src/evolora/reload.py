"""Rebuild a finished run's model from its folder: config, structure (replaying `grow`), final tensors."""

from __future__ import annotations

from pathlib import Path

from evolora import atomic
from evolora.config import load_config
from evolora.engine import build_context, checkpoint_path, evaluate_row, load_checkpoint
from evolora.errors import EvoloraError
from evolora.state import read_progress


def load_run(run_dir: Path, overrides: list[str] = ()):
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml", overrides)
    ctx, method = build_context(config, run_dir, log=lambda _: None)
    progress = read_progress(run_dir) or {}
    if len(progress.get("R", [])) != len(ctx.stages):
        raise EvoloraError(f"{run_dir}: the run has not finished (resume it with evolora run --resume)")
    path = checkpoint_path(run_dir, len(ctx.stages) - 1)
    for stage in range(len(ctx.stages)):
        method.grow(stage, ctx)
    load_checkpoint(ctx, method, path, progress.get("checkpoints", {}).get(path.name))
    ctx.model.eval()
    return ctx, method


def evaluate_run(run_dir: Path, overrides: list[str] = ()) -> dict:
    ctx, method = load_run(run_dir, overrides)
    row, info = evaluate_row(ctx, method, list(range(len(ctx.tasks))), ctx.config.eval.task_id)
    result = {"accuracy": {t.name: a for t, a in zip(ctx.tasks, row)}, "mean": sum(row) / len(row),
              "mode": ctx.config.eval.mode, "task_id": ctx.config.eval.task_id,
              **({"locator": info["locator"]} if info["locator"] else {})}
    atomic.write_json(Path(run_dir) / "eval.json", result)
    return result
