"""Seconds spent evaluating R with the eval cache (`eval.cache: true`, the default) and without it, per method,
on the same stream and seed, and whether the two runs' R are identical.

The cache reuses a task's score while the tensors that answer it are unchanged (per_task_lora's earlier
adapters, frozen experts, shared-expert snapshots): each stage re-scores only what changed. The runs use the
benchmark config (test split, batch size and scoring as in the suite) with a small training budget, since
training is not what is measured, and without the general-text and knowledge probes, so that `eval` is R's
scoring alone.

    python benchmarks/eval_cache.py [--config benchmarks/mtl5_cpu.yaml] [--methods per_task_lora moe_cl:variant=evolora]
                                    [--train-per-label 8] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from evolora.config import build_config, load_yaml
from evolora.engine import run as run_stream

HERE = Path(__file__).resolve().parent


def method_overrides(spec: str) -> list[str]:
    """`moe_cl:variant=evolora,dropout=0` -> the method's name and options as config overrides."""
    name, _, options = spec.partition(":")
    out = [f"method.name={name}"]
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        out.append(f"method.options.{key}={value}")
    return out


def measure(raw: dict, spec: str, cache: bool, extra: list[str], folder: Path) -> dict:
    name = spec.replace(":", "_").replace("=", "-").replace(",", "_")
    overrides = [*method_overrides(spec), f"eval.cache={str(cache).lower()}", "eval.general_text=null",
                 "eval.general_tasks=[]", "eval.locate_final=false", "data.dev_per_label=0",
                 f"name=eval-cache-{name}", *extra]
    base = dict(raw)
    if (raw.get("method") or {}).get("name") != spec.partition(":")[0]:
        base = {**raw, "method": {"name": spec.partition(":")[0]}}  # the base config's options are another method's
    config = build_config(base, overrides, source=f"eval_cache [{spec}]")
    metrics = run_stream(config, folder / f"{name}-{'cache' if cache else 'nocache'}", log=lambda m: None)
    stages = metrics["stages"]
    return {"R": metrics["R"], "eval_s": [s["eval_s"] for s in stages], "reused": [s["eval_reused"] for s in stages]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "mtl5_cpu.yaml")
    parser.add_argument("--methods", nargs="+", default=["per_task_lora", "moe_cl:variant=evolora", "seq_lora"])
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], dest="extra", help="more config overrides")
    args = parser.parse_args()
    raw = load_yaml(args.config)
    extra = [f"data.train_per_label={args.train_per_label}", *args.extra]
    print(f"config {args.config.name}, train_per_label {args.train_per_label}, overrides {extra[1:] or 'none'}")
    print("| method | eval s, cache off | eval s, cache on | saved | task scores reused | R identical |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="evolora-eval-cache-") as tmp:
        for spec in args.methods:
            off = measure(raw, spec, False, extra, Path(tmp))
            on = measure(raw, spec, True, extra, Path(tmp))
            total_off, total_on = sum(off["eval_s"]), sum(on["eval_s"])
            scored = sum(sum(a is not None for a in row) for row in on["R"])
            print(f"| {spec} | {total_off:.0f} | {total_on:.0f} | {100 * (1 - total_on / total_off):.0f} % "
                  f"| {sum(on['reused'])} of {scored} | {'yes' if on['R'] == off['R'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
