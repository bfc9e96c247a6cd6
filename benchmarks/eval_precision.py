"""How much of a finished run's accuracy is arithmetic rounding: its final model evaluated (oracle task id) in
the run's dtype and in fp32, per task, with the number of test predictions that differ between the two and
from the run's own last-stage predictions (which an older version of the code may have made).

    python benchmarks/eval_precision.py RUN_DIR [--tasks yelp amazon]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evolora.engine import evaluate_row
from evolora.reload import load_run, run_precision
from evolora.report import predictions_path
from evolora.engine.state import read_progress


def evaluate(run_dir: Path, tasks: list[str], overrides: list[str]) -> tuple[str, dict[str, float], dict[str, list]]:
    with run_precision(run_dir, overrides):
        ctx, method = load_run(run_dir, overrides)
        names = [t.name for t in ctx.tasks]
        chosen = [names.index(t) for t in tasks] if tasks else list(range(len(names)))
        row, info = evaluate_row(ctx, method, chosen, "oracle")
        dtype = str(next(ctx.model.parameters()).dtype).removeprefix("torch.")
    return dtype, {names[j]: row[j] for j in chosen}, info["predictions"]


def run_predictions(run_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per task, the run's last-stage (predictions, gold answers) in test order; empty if not kept."""
    stages = len((read_progress(run_dir) or {}).get("R", []))
    path = predictions_path(run_dir, f"stage-{stages:02d}")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        ordered = sorted((r for r in rows if r["task"] == task), key=lambda r: r["index"])
        out[task] = ([r["prediction"] for r in ordered], [r["gold"] for r in ordered])
    return out


def differing(a: list, b: list) -> int:
    return sum(x != y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", nargs="*", default=[], help="task names (default: every task of the stream)")
    args = parser.parse_args()
    dtype, low, low_predictions = evaluate(args.run_dir, args.tasks, [])
    _, high, high_predictions = evaluate(args.run_dir, args.tasks, ["model.dtype=fp32"])
    recorded = run_predictions(args.run_dir)
    print(f"| task | examples | {dtype} | fp32 | differ {dtype}/fp32 | run's last stage | differ run/{dtype} | differ run/fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for task in low:
        ours, ref = low_predictions[task], high_predictions[task]
        run_cells = " |  | "
        if task in recorded:
            run, gold = recorded[task]
            run_cells = (f"{100.0 * sum(p == g for p, g in zip(run, gold)) / len(gold):.1f} | "
                         f"{differing(run, ours)} | {differing(run, ref)}")
        print(f"| {task} | {len(ours)} | {low[task]:.1f} | {high[task]:.1f} | {differing(ours, ref)} | {run_cells} |")


if __name__ == "__main__":
    main()
