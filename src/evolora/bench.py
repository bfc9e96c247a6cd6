"""Benchmark suites: several runs on one stream with identical data, seeds and budget. Each run's
metrics.json is kept under the suite's results folder; runs whose results exist are skipped, so a suite
can be run method by method across sessions. The results table (docs/RESULTS.md) is rebuilt from those
files only, never typed."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evolora import atomic
from evolora.config import build_config, check_name, load_yaml
from evolora.errors import ConfigError


class SuiteRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    addons: dict[str, Optional[dict]] = Field(default_factory=dict)
    """Add-ons composed with the method (e.g. `{gere: {loss: tm}}`)."""
    label: Optional[str] = None
    """Name in the table; default: the method name and its add-ons joined with `+`."""
    set: list[str] = Field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label or "+".join([self.method, *self.addons])


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str
    """The run config every run starts from (relative to the suite file)."""
    results: str = "results"
    """The results folder, relative to the suite file and inside its folder."""
    runs_dir: str = "runs/bench"
    """Where the runs' folders go (any path: a run folder is replaced only when evolora marked it)."""
    runs: list[SuiteRun]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "name")

    @field_validator("results")
    @classmethod
    def _inside(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"results: {value[:80]!r} must be a folder inside the suite file's folder (relative, no ..)")
        return value


def load_suite(path: Path) -> Suite:
    raw = load_yaml(path)
    try:
        return Suite.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {field}: {first['msg'].removeprefix('Value error, ')}") from None


def file_stem(label: str) -> str:
    """A label as a file name: `moe_cl/ffn` -> `moe_cl_ffn`."""
    import re

    stem = re.sub(r"[^A-Za-z0-9_.+=-]", "_", label)
    return re.sub(r"^\.", "_", stem) or "_"  # never `.`, `..` or a hidden name: it also names the run's folder


def result_path(suite_path: Path, suite: Suite, run: SuiteRun, order: Optional[int] = None) -> Path:
    stem = file_stem(run.name) + (f"-order{order}" if order is not None else "")
    return suite_path.parent / suite.results / suite.name / f"{stem}.json"


def run_suite(suite_path: Path, only: Optional[list[str]] = None, log=print,
              orders: Optional[list[int]] = None, rerun: bool = False) -> list[Path]:
    """Runs every entry of the suite (for each of `orders` when given) whose results file is missing.
    `rerun` runs the selected entries again from scratch: their results and run folders are replaced (an
    existing run folder would otherwise be resumed, even a finished one made by older code)."""
    done = []
    for order in orders or [None]:
        done += _run_suite_order(suite_path, only, log, order, rerun)
    return done


def _run_suite_order(suite_path: Path, only, log, order: Optional[int], rerun: bool = False) -> list[Path]:
    from evolora.engine import run as run_stream
    from evolora.methods import validate_method_options

    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    base = load_yaml(suite_path.parent / suite.base)
    done = []
    for entry in suite.runs:
        if only and entry.name not in only:
            continue
        target = result_path(suite_path, suite, entry, order)
        if target.is_file() and not rerun:
            log(f"[{entry.name}] results exist: {target} (skipped)")
            done.append(target)
            continue
        run_dir = Path(suite.runs_dir) / suite.name / target.stem
        overrides = [f"method.name={entry.method}", f"method.addons={json.dumps(entry.addons)}",
                     f"name={suite.name}-{target.stem}",
                     "output.overwrite=true", *entry.set, *([f"data.order={order}"] if order is not None else [])]
        source = f"{suite_path} [{entry.name}]"
        config = build_config(_base_for(base, entry.method), overrides, source=source)
        validate_method_options(config.method, source)
        resume = not rerun and can_resume(config, run_dir)
        log(f"[{entry.name}] {'resuming' if resume else 'running into'} {run_dir}")
        metrics = run_stream(config, run_dir, log=lambda m, n=entry.name: log(f"[{n}] {m}"), resume=resume)
        metrics["bench"] = {"suite": suite.name, "label": entry.name, "overrides": overrides,
                            "command": " ".join(["evolora", *sys.argv[1:]]) or "evolora bench",
                            "date": datetime.date.today().isoformat(), "machine": machine_description()}
        atomic.write_json(target, metrics)
        done.append(target)
    return done


def can_resume(config, run_dir: Path) -> bool:
    """A run folder left by an interrupted suite run with the same config is continued, not restarted."""
    from evolora.engine import check_resume_config
    from evolora.errors import EvoloraError
    if not (run_dir / "config.yaml").is_file():
        return False
    try:
        check_resume_config(config, run_dir)
    except EvoloraError:
        return False
    return True


def _base_for(base: dict, method: str) -> dict:
    """The base config for another method keeps only the method options that method has (a LoRA rank
    means nothing to full fine-tuning)."""
    import dataclasses

    from evolora.methods import method_class

    section = dict(base.get("method") or {})
    if section.get("name", method) == method:
        return base
    options_type = method_class(method).Options
    known = {f.name for f in dataclasses.fields(options_type)} if options_type else set()
    section["options"] = {k: v for k, v in (section.get("options") or {}).items() if k in known}
    return {**base, "method": section}


def machine_description() -> str:
    import os

    import torch

    # The CPU's vector extensions decide bf16 speed (AVX2 alone: bf16 products run in fp32, about 3x slower
    # than AVX-512's bf16), so minutes from machines of another capability are not comparable.
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU x{os.cpu_count()} {torch.backends.cpu.get_cpu_capability()}"
    return f"{device}, {platform.machine()}, torch {torch.__version__}"


COLUMNS = ["method", "AP", "Avg", "BWT", "FWT", "drift", "knowledge", "locator", "params/task", "minutes"]


def _cell(value, digits=1) -> str:
    if value is None:
        return ""
    return f"{value:.1e}" if abs(value) >= 1e6 else f"{value:.{digits}f}"  # a diverged run's drift stays readable


def table_rows(metrics: dict) -> list[list[str]]:
    """One row per run; a run evaluated with located task ids as well gives `label (oracle)` and
    `label (locate)` (the latter from the final model only, so only AP and the locator's accuracy)."""
    m = metrics.get("metrics", {})
    label = metrics.get("bench", {}).get("label") or metrics["method"]
    params = metrics.get("parameters", {}).get("added_per_task")
    params_cell = f"{params:,.0f}" if params is not None else ""
    minutes = _cell(metrics["timings"]["total_s"] / 60)
    locate = metrics.get("locate")
    first = [label + (" (oracle)" if locate else ""), _cell(m.get("AP")), _cell(m.get("Avg")), _cell(m.get("BWT")),
             _cell(m.get("FWT")), _cell(m.get("drift_pct")), _cell(m.get("knowledge_pts")), "", params_cell, minutes]
    if not locate:
        return [first]
    return [first, [f"{label} (locate)", _cell(locate["AP"]), "", "", "", "", "", _cell(locate["locator"]), params_cell,
                    minutes]]


def _aggregate(runs: list[dict]) -> list[dict]:
    """Groups runs of the same label over task orders: the table shows mean ± std per label."""
    groups: dict[str, list[dict]] = {}
    for metrics in runs:
        groups.setdefault(metrics.get("bench", {}).get("label") or metrics["method"], []).append(metrics)
    return [{"label": label, "runs": group} for label, group in groups.items()]


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def aggregated_rows(label: str, runs: list[dict]) -> list[list[str]]:
    if len(runs) == 1:
        return table_rows(runs[0])

    def col(key):
        return _mean_std([r.get("metrics", {}).get(key) for r in runs])

    params = runs[0].get("parameters", {}).get("added_per_task")
    params_cell = f"{params:,.0f}" if params is not None else ""
    minutes = _mean_std([r["timings"]["total_s"] / 60 for r in runs])
    located = [r["locate"] for r in runs if r.get("locate")]
    name = f"{label} ({len(runs)} orders)"
    rows = [[name.replace(" (", " (oracle, ", 1) if located else name, col("AP"), col("Avg"), col("BWT"), col("FWT"),
             col("drift_pct"), col("knowledge_pts"), "", params_cell, minutes]]
    if located:
        rows.append([f"{label} (locate, {len(located)} orders)", _mean_std([x["AP"] for x in located]), "", "", "",
                     "", "", _mean_std([x["locator"] for x in located]), params_cell, minutes])
    return rows


def results_markdown(result_files: list[Path]) -> str:
    by_suite: dict[str, list[dict]] = {}
    for path in result_files:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
        by_suite.setdefault(metrics.get("bench", {}).get("suite", "runs"), []).append(metrics)
    lines = ["# Results of record", "",
             "Generated by `evolora bench` from the metrics files under `benchmarks/results/`; do not edit by hand.",
             "Accuracy columns are points (0-100); `drift` is the held-out general-text perplexity change (%);",
             "`knowledge` is the change of general-knowledge accuracy (points; wordnet_mc, 1,000 multiple-choice",
             "questions never trained on, choices scored by log-likelihood per token, i.e. acc_norm);",
             "`locator` is task-locator accuracy (%); `params/task` is parameters added to the base model per task (full",
             "fine-tuning adds none: it changes the base weights); `minutes` is the run's wall time including evaluation, on",
             "the machine the Runs list names for it (a GPU row's minutes are not comparable with a CPU row's).", ""]
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body, notes = [], []
    for suite, runs in by_suite.items():
        body += ["", f"## {suite}", ""]
        note = next((m["bench"]["note"] for m in runs if m.get("bench", {}).get("note")), None)
        if note:
            body += [f"Every row here was {note}.", ""]
        body += [header, rule]
        for group in _aggregate(runs):
            body += ["| " + " | ".join(row) + " |" for row in aggregated_rows(group["label"], group["runs"])]
        for metrics in runs:
            b = metrics.get("bench", {})
            stream = metrics["stream"]
            notes.append(f"- `{b.get('label', metrics['method'])}` ({suite}): {stream['name']} order {stream['order']}"
                         f" ({' → '.join(stream['tasks'])}), model {metrics['model']}; {b.get('date', '')} on "
                         f"{b.get('machine', '')}; `{b.get('command', '')}`")
    return "\n".join(lines + body + ["", "Runs:", ""] + notes) + "\n"


def write_results(result_files: list[Path], out: Path) -> Path:
    atomic.write_text(out, results_markdown(result_files))
    return out


def all_result_files(results_root: Path, suite_path: Optional[Path] = None) -> list[Path]:
    """Every results file under the root; those of `suite_path` first, in the suite's order."""
    files = sorted(Path(results_root).glob("*/*.json"))
    if suite_path is None:
        return files
    suite = load_suite(Path(suite_path))
    folder = Path(results_root) / suite.name
    first = []
    for entry in suite.runs:
        stem = file_stem(entry.name)
        first += [p for p in sorted(folder.glob("*.json")) if p.stem == stem or p.stem.startswith(stem + "-order")]
    return first + [p for p in files if p not in first]


# --- comparison of finished runs ------------------------------------------------------------------------

def _paired_against_first(predictions: list[Optional[dict]]) -> dict[int, dict]:
    """Paired bootstrap of AP, each run (by position) against the first, where both were evaluated on the
    same examples."""
    from evolora.metrics import paired_ap_bootstrap

    reference = predictions[0]
    paired = {}
    for index, mine in enumerate(predictions[1:], 1):
        if reference is None or mine is None:
            continue
        try:
            paired[index] = paired_ap_bootstrap(reference, mine)
        except ValueError:
            continue  # different tasks or test sets: nothing to pair
    return paired


def _paired_table(labels: list[str], paired: dict[int, dict]) -> str:
    if not paired:
        return ""
    samples = next(iter(paired.values()))["samples"]
    lines = [f"\nAP against {labels[0]}, final models on the same test examples (paired bootstrap, "
             f"{samples} resamples):\n\n| run | ΔAP | 95 % interval | ahead in |\n|---|---|---|---|\n"]
    for index, p in paired.items():
        lines.append(f"| {labels[index]} | {p['delta_AP']:+.1f} | {p['low']:+.1f} … {p['high']:+.1f} | "
                     f"{100 * p['ahead']:.0f} % |\n")
    return "".join(lines)


def compare(metrics_list: list[dict], out_dir: Path,
            final_predictions: Optional[list[Optional[dict]]] = None) -> dict[str, Path]:
    """Comparison table (Markdown + JSON) and plots (AP/BWT/FWT bars, R heatmaps side by side). With the
    runs' final per-example correctness (`final_predictions`, one entry per run, None where a run has
    none), each run's AP is also compared with the first run's by a paired bootstrap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [m.get("bench", {}).get("label") or m["name"] for m in metrics_list]
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|\n"
    body = "".join("| " + " | ".join([label + row[0][len(m.get("bench", {}).get("label") or m["method"]):]] + row[1:])
                   + " |\n" for label, m in zip(labels, metrics_list) for row in table_rows(m))
    paths = {"markdown": out_dir / "comparison.md", "json": out_dir / "comparison.json",
             "bars": out_dir / "metrics_bars.png", "heatmaps": out_dir / "R_heatmaps.png"}
    paired = _paired_against_first(final_predictions) if final_predictions else {}
    atomic.write_text(paths["markdown"], header + body + _paired_table(labels, paired))
    atomic.write_json(paths["json"], [{"label": label, "metrics": m.get("metrics", {}), "R": m["R"],
                                       "zero_shot": m.get("zero_shot"), "parameters": m.get("parameters"),
                                       "timings": m.get("timings"),
                                       **({"paired_vs_first": paired[i]} if i in paired else {})}
                                      for i, (label, m) in enumerate(zip(labels, metrics_list))])

    keys = ["AP", "BWT", "FWT"]
    width = 0.8 / len(keys)
    x = np.arange(len(labels))
    horizontal = len(labels) > 10  # a long suite: one row per run, read top to bottom like the table
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.32 * len(labels)))
    else:
        fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(labels), 3.8))
    for k, key in enumerate(keys):
        values = [np.nan if v is None else v for v in (m.get("metrics", {}).get(key) for m in metrics_list)]
        (ax.barh if horizontal else ax.bar)(x + k * width, values, width, label=key)
    if horizontal:
        ax.set_yticks(x + width, labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("points")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(x + width, labels, rotation=20, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel("points")
        ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(paths["bars"]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(metrics_list), figsize=(3.2 * len(metrics_list), 3.2), squeeze=False)
    for ax, label, m in zip(axes[0], labels, metrics_list):
        data = np.array([[np.nan if v is None else v for v in row] for row in m["R"]], dtype=float)
        ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(m["stream"]["tasks"])), m["stream"]["tasks"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(m["R"])), [f"after {i + 1}" for i in range(len(m["R"]))], fontsize=7)
    fig.tight_layout()
    with atomic.atomic_path(paths["heatmaps"]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    drifted = [(label, m["general"]) for label, m in zip(labels, metrics_list) if m.get("general")]
    if drifted:  # general-text perplexity drift over the stream, one line per run
        paths["drift"] = out_dir / "general_drift.png"
        columns = 1 + (len(drifted) - 1) // 16  # a suite of 30 runs: the legend beside the plot, in columns
        fig, ax = plt.subplots(figsize=(6 + 2.4 * columns, 3.6 + 0.1 * min(len(drifted), 16)))
        colors = plt.get_cmap("tab20").colors
        for i, (label, general) in enumerate(drifted):
            ax.plot(range(len(general["perplexity"])), [0.0] + general["drift_pct_per_stage"], marker="o",
                    markersize=3, color=colors[i % len(colors)], linestyle=("-", "--", ":")[i // len(colors) % 3],
                    label=label)
        ax.set_xlabel("stage (0 = base model)")
        ax.set_ylabel("held-out perplexity change (%)")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, frameon=False)
        fig.tight_layout()
        with atomic.atomic_path(paths["drift"]) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths
