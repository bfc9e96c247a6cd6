"""Which part of GeRe costs a task's accuracy: one task learned from the base model with seq_lora alone and with
GeRe variants (the default TM loss with its dynamic weight, plain CE replay, TM with the general part scaled
down, TM with a fixed weight). Prints the task's accuracy and the held-out general perplexity drift per variant.

    python benchmarks/gere_plasticity.py [CONFIG] [--order 4] [--out runs/gere_plasticity]

CONFIG defaults to benchmarks/mtl5_cpu.yaml (the benchmark of record: same budget, model and data); the stream
is cut to its first task (MTL5 order 4 starts with agnews, where the full-stream runs lost the most). A variant
whose run folder already holds a finished metrics.json is read, not rerun; one left unfinished is resumed, as the
suite command does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from evolora import atomic
from evolora.bench import can_resume, file_stem
from evolora.config import load_config
from evolora.engine import run

HERE = Path(__file__).resolve().parent
TEXTS = "../shared/data/general/replay_1000.jsonl"

VARIANTS = {
    "seq_lora": [],
    "gere (tm, dynamic weight)": [f"method.addons.gere.texts={TEXTS}"],
    "gere (ce only)": [f"method.addons.gere.texts={TEXTS}", "method.addons.gere.loss=ce"],
    "gere (tm, general_weight 0.1)": [f"method.addons.gere.texts={TEXTS}", "method.addons.gere.general_weight=0.1"],
    "gere (tm, weight 1)": [f"method.addons.gere.texts={TEXTS}", "method.addons.gere.weight=1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(HERE / "mtl5_cpu.yaml"))
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--out", default="runs/gere_plasticity")
    parser.add_argument("--results", default=str(HERE / "results" / "mtl5_cpu" / "gere_plasticity.md"))
    args = parser.parse_args()

    rows = []
    for label, overrides in VARIANTS.items():
        run_dir = Path(args.out) / file_stem(label)
        metrics_path = run_dir / "metrics.json"
        record = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        if not (record and record.get("complete")):
            cfg = load_config(args.config, [f"data.order={args.order}", "data.max_tasks=1", "output.overwrite=true",
                                            *overrides])
            record = run(cfg, run_dir, resume=can_resume(cfg, run_dir))
        task = record["stream"]["tasks"][0]
        stage = record["stages"][0]["train"]
        rows.append(f"| {label} | {record['zero_shot'][0]:.1f} | {record['R'][0][0]:.1f} | "
                    f"{record['metrics'].get('drift_pct', float('nan')):+.1f} | {stage['seconds']:.0f} | "
                    f"{stage['tokens_per_s']:.0f} |")
    table = "\n".join([f"| variant | {task} zero-shot | {task} after training | drift % | train s | tok/s |",
                       "|---|---|---|---|---|---|", *rows])
    atomic.write_text(Path(args.results),
                      f"`python benchmarks/gere_plasticity.py --order {args.order}` ({os.path.relpath(args.config)}, first task "
                      f"only):\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
