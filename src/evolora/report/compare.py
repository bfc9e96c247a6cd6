"""`evolora compare`: finished runs side by side (table, JSON, plots) and, where their per-example predictions
allow, each run's AP against the first run's by a paired bootstrap."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from evolora import atomic
from evolora.metrics import ap_bootstrap
from evolora.report.tables import COLUMNS, table_rows


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


def _order_note(metrics: dict) -> str:
    """`order N` for a benchmark run made on one task order (a suite's runs of a label differ only by it)."""
    bench, order = metrics.get("bench"), metrics.get("stream", {}).get("order")
    return f"order {order}" if bench and bench.get("per_order", True) and order is not None else ""


def compare(metrics_list: list[dict], out_dir: Path,
            final_predictions: Optional[list[Optional[dict]]] = None) -> dict[str, Path]:
    """Comparison table (Markdown + JSON) and plots (AP/BWT/FWT bars, R heatmaps side by side). With the
    runs' final per-example correctness (`final_predictions`, one entry per run, None where a run has
    none), each run's AP is also compared with the first run's by a paired bootstrap."""
    import matplotlib

    matplotlib.use("Agg")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [m.get("bench", {}).get("label") or m["name"] for m in metrics_list]
    notes = [_order_note(m) for m in metrics_list]
    labels = [name + (f" ({note})" if note else "") for name, note in zip(names, notes)]
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|\n"
    # table_rows names a row by its bench label or method; a run outside a suite goes by its run name here
    body = "".join("| " + " | ".join([name + row[0][len(m.get("bench", {}).get("label") or m["method"]):]] + row[1:])
                   + " |\n" for name, note, m in zip(names, notes, metrics_list) for row in table_rows(m, note))
    paths = {"markdown": out_dir / "comparison.md", "json": out_dir / "comparison.json",
             "bars": out_dir / "metrics_bars.png", "heatmaps": out_dir / "R_heatmaps.png"}
    paired = _paired_against_first(final_predictions) if final_predictions else {}
    atomic.write_text(paths["markdown"], header + body + _paired_table(labels, paired))
    atomic.write_json(paths["json"], [{"label": label, "metrics": m.get("metrics", {}), "R": m["R"],
                                       "zero_shot": m.get("zero_shot"), "parameters": m.get("parameters"),
                                       "timings": m.get("timings"),
                                       **({"paired_vs_first": paired[i]} if i in paired else {})}
                                      for i, (label, m) in enumerate(zip(labels, metrics_list))])

    intervals = [None if not final_predictions or not final_predictions[i] else ap_bootstrap(final_predictions[i])
                 for i in range(len(metrics_list))]
    _bars(labels, metrics_list, intervals, paths["bars"])
    _heatmaps(labels, metrics_list, paths["heatmaps"])
    drifted = [(label, m["general"]) for label, m in zip(labels, metrics_list) if m.get("general")]
    if drifted:
        paths["drift"] = out_dir / "general_drift.png"
        _drift(drifted, paths["drift"])
    return paths


def _save(fig, path: Path, **kwargs) -> None:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, **kwargs)
    plt.close(fig)


def _bars(labels: list[str], metrics_list: list[dict], intervals: list[Optional[dict]], path: Path) -> None:
    """AP, BWT and FWT per run; AP with its 95 % bootstrap interval where the run kept its predictions. More than
    ten runs: one horizontal row per run, read top to bottom like the table."""
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ["AP", "BWT", "FWT"]
    width = 0.8 / len(keys)
    x = np.arange(len(labels))
    horizontal = len(labels) > 10
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.32 * len(labels)) if horizontal else (1.5 + 1.4 * len(labels), 3.8))
    for k, key in enumerate(keys):
        values = [np.nan if v is None else v for v in (m.get("metrics", {}).get(key) for m in metrics_list)]
        errors = None
        if key == "AP" and any(intervals):
            errors = np.array([[0.0, 0.0] if iv is None or np.isnan(v) else [max(0.0, v - iv["low"]), max(0.0, iv["high"] - v)]
                               for v, iv in zip(values, intervals)]).T
        (ax.barh if horizontal else ax.bar)(x + k * width, values, width, label=key + (" (95 % interval)" if errors
                                                                                   is not None else ""),
                                            **({"xerr" if horizontal else "yerr": errors, "capsize": 2}
                                               if errors is not None else {}))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _heatmaps(labels: list[str], metrics_list: list[dict], path: Path) -> None:
    """Each run's R as a small heatmap with its numbers, in a grid of at most six columns (40 runs: 7 rows)."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    n = len(metrics_list)
    columns = min(6, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.9 * columns, 2.7 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= n:
            ax.axis("off")
            continue
        m, label = metrics_list[index], labels[index]
        data = np.array([[np.nan if v is None else v for v in row] for row in m["R"]], dtype=float)
        ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=8)
        tasks = m["stream"]["tasks"]
        ax.set_xticks(range(len(tasks)), [t[:8] for t in tasks], rotation=45, ha="right", fontsize=6)
        ax.set_yticks(range(len(m["R"])), [f"after {i + 1}" for i in range(len(m["R"]))], fontsize=6)
        if data.size <= 400:  # numbers stay legible up to 20 x 20
            for i, j in zip(*np.where(~np.isnan(data))):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=5 if data.shape[1] > 8 else 7,
                        color="white" if data[i, j] < 60 else "black")
    fig.tight_layout()
    _save(fig, path)


def _drift(drifted: list[tuple[str, dict]], path: Path) -> None:
    """General-text perplexity drift over the stream, one line per run: colour, line style and marker together
    tell up to 20 x 3 x 4 runs apart; the legend beside the plot, in columns."""
    import matplotlib.pyplot as plt

    columns = 1 + (len(drifted) - 1) // 16
    fig, ax = plt.subplots(figsize=(6 + 2.4 * columns, 3.6 + 0.1 * min(len(drifted), 16)))
    colors = plt.get_cmap("tab20").colors
    markers = ("o", "s", "^", "D")
    for i, (label, general) in enumerate(drifted):
        ax.plot(range(len(general["perplexity"])), [0.0] + general["drift_pct_per_stage"], markersize=3,
                color=colors[i % len(colors)], linestyle=("-", "--", ":")[i // len(colors) % 3],
                marker=markers[i // (3 * len(colors)) % len(markers)], label=label)
    ax.set_xlabel("stage (0 = base model)")
    ax.set_ylabel("held-out perplexity change (%)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, frameon=False)
    fig.tight_layout()
    _save(fig, path, bbox_inches="tight")
