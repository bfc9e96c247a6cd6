"""The run report: R heatmap and accuracy-over-time plots (PNG) and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from evolora import atomic, runfolder
from evolora.errors import EvoloraError


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / runfolder.METRICS
    if not path.is_file():
        raise EvoloraError(f"{path}: not found (is {run_dir} an evolora run folder?)")
    metrics = runfolder.read_json(path, "metrics record")
    for key, shape in (("R", list), ("stream", dict), ("method", str), ("timings", dict)):
        if not isinstance(metrics.get(key), shape):
            raise EvoloraError(f"{path}: metrics record has no {key!r} {shape.__name__} (not an evolora metrics.json)")
    return metrics


def predictions_path(run_dir: Path, label: str) -> Path:
    """Where a run folder keeps the predictions of one evaluation (`stage-NN`, `final-located`, `eval-...`)."""
    return Path(run_dir) / runfolder.PREDICTIONS / f"{label}.jsonl"


def read_final_predictions(run_dir: Path, metrics: dict) -> dict[str, list[bool]] | None:
    """Per-example correctness of the final model on every task: the predictions of the last stage, or
    those of a plain `evolora eval RUN_DIR` of the final checkpoint (same evaluation settings, so the same
    predictions) for runs made before predictions were kept; None when the run folder has neither."""
    if not metrics.get("R"):
        return None
    path = predictions_path(run_dir, f"stage-{len(metrics['R']):02d}")
    if not path.is_file():
        path = predictions_path(run_dir, "eval-oracle")
        try:
            evaluated = json.loads((Path(run_dir) / "eval.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not path.is_file() or evaluated.get("overrides") or evaluated.get("mode") != metrics.get("eval_mode") \
                or evaluated.get("task_id") != "oracle":
            return None
    return read_correctness(path)


def read_correctness(path: Path) -> dict[str, list[bool]]:
    """A predictions file as task -> per-example correctness, in the file's order."""
    correct: dict[str, list[bool]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            correct.setdefault(row["task"], []).append(bool(row["correct"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvoloraError(f"{path}:{number}: not a prediction line") from None
    return correct


def _fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _plot_heatmap(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = metrics["stream"]["tasks"]
    rows = ([("zero-shot", metrics["zero_shot"])] if metrics.get("zero_shot") else []) + [
        (f"after {'+'.join(stage['tasks'])}", row) for stage, row in zip(metrics["stages"], metrics["R"])]
    data = np.array([[np.nan if v is None else v for v in row] for _, row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(tasks), 0.9 + 0.5 * len(rows)))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center",
                        color="white" if data[i, j] < 60 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(f"{metrics['method']}: accuracy matrix R")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_over_time(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics["stream"]["tasks"]
    zero = metrics.get("zero_shot")
    steps = (["zero-shot"] if zero else []) + [f"{i + 1}" for i in range(len(metrics["R"]))]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for j, name in enumerate(tasks):
        values = ([zero[j]] if zero else []) + [row[j] for row in metrics["R"]]
        xs = [x for x, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[x] for x in xs], marker="o", label=name)
    ax.set_xticks(range(len(steps)), steps)
    ax.set_xlabel("after training stage")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{metrics['method']}: per-task accuracy over the stream")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_loss(run_dir: Path, metrics: dict, path: Path) -> bool:
    """Training loss per logged step over the whole stream (steps.jsonl), a dashed line at each new stage."""
    steps_file = Path(run_dir) / runfolder.STEPS
    if not steps_file.is_file():
        return False
    records = []
    for line in steps_file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    records = [r for r in records if isinstance(r, dict) and {"stage", "step", "loss"} <= r.keys()]
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets, total = {}, 0
    for i, stage in enumerate(metrics.get("stages", [])):
        offsets[i] = total
        total += stage["train"]["steps"]
    xs = [offsets.get(r["stage"], 0) + r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(xs, [r["loss"] for r in records], linewidth=1, label="loss")
    if any("task_loss" in r and r["task_loss"] != r["loss"] for r in records):
        ax.plot(xs, [r.get("task_loss") for r in records], linewidth=1, linestyle="--", label="task loss")
        ax.legend(fontsize=8)
    for start in list(offsets.values())[1:]:
        ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training step (dotted: a new stage)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def matrix_text(metrics: dict) -> str:
    """The R matrix as aligned text, for the terminal."""
    tasks = metrics["stream"]["tasks"]
    width = max(8, *(len(t) for t in tasks)) + 1
    lines = ["".ljust(14) + "".join(t.rjust(width) for t in tasks)]
    if metrics.get("zero_shot"):
        lines.append("zero-shot".ljust(14) + "".join(_fmt(v).rjust(width) for v in metrics["zero_shot"]))
    for i, row in enumerate(metrics["R"]):
        lines.append(f"after stage {i + 1}".ljust(14) + "".join(_fmt(v).rjust(width) for v in row))
    return "\n".join(lines)


def summary_text(metrics: dict) -> str:
    m = metrics["metrics"]
    parts = [f"{k} {_fmt(m.get(k))}" for k in ("AP", "Avg", "BWT", "FWT", "forgetting", "drift_pct", "knowledge_pts")
             if m.get(k) is not None]
    return "  ".join(parts)


ZERO_SHOT = "mean zero-shot accuracy of the base model"


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    plots = run_dir / "plots"
    heatmap, over_time = plots / "R_heatmap.png", plots / "accuracy_over_time.png"
    _plot_heatmap(metrics, heatmap)
    _plot_over_time(metrics, over_time)
    loss = plots / "training_loss.png"
    has_loss = _plot_loss(run_dir, metrics, loss)

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'

    from evolora.metrics import DEFINITIONS, ap_bootstrap

    m = metrics["metrics"]
    names = {"drift_pct": "drift", "knowledge_pts": "knowledge", "zero_shot_mean": "zero-shot mean"}
    rows = "".join(f"<tr><td>{names.get(k, k)}</td><td>{_fmt(m.get(k), 2)}</td>"
                   f"<td class=d>{html.escape(DEFINITIONS.get(names.get(k, k), ZERO_SHOT))}</td></tr>"
                   for k in ("AP", "Avg", "BWT", "FWT", "forgetting", "zero_shot_mean", "drift_pct", "knowledge_pts")
                   if k in m)
    correct = read_final_predictions(run_dir, metrics) if metrics.get("complete") else None
    interval = ap_bootstrap(correct) if correct else None
    interval_html = "" if interval is None else (
        f"<p>AP {interval['AP']:.2f}, 95 % bootstrap interval {interval['low']:.1f} … {interval['high']:.1f} "
        f"(each task's test set resampled {interval['samples']} times; n per task: "
        + ", ".join(f"{html.escape(t)} {n}" for t, n in interval["n"].items()) + ")</p>")
    dev = metrics.get("dev")
    if dev:
        interval_html += (f"<p>Dev split (carved from train, for choosing options; never the test split): AP "
                          f"{dev['AP']:.2f} over " + ", ".join(f"{html.escape(t)} {n}" for t, n in dev["n"].items())
                          + " examples.</p>")
    config_path = run_dir / runfolder.CONFIG
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    env = metrics.get("environment") or {}
    env_text = " · ".join(f"{k} {html.escape(str(v))}" for k, v in env.items())
    locate = metrics.get("locate")
    locate_html = ""
    if locate:
        per_task = ", ".join(f"{html.escape(k)} {v:.1f} %" for k, v in locate["locator_per_task"].items())
        kinds = ", ".join(f"{k} {v:.1f} %" for k, v in locate["locator_by_kind"].items())
        locate_html = (f"<h2>Without task ids</h2><p>final model, experts chosen by the task locator "
                       f"({html.escape(locate['locator_kind'])}): AP {locate['AP']:.2f}; located correctly: {per_task}. "
                       f"Locator accuracy by density model: {kinds}.</p>")
    general = metrics.get("general")
    general_html = ""
    if general:
        steps = " → ".join(f"{p:.2f}" for p in general["perplexity"])
        general_html = (f"<h2>General ability</h2><p>held-out perplexity of {html.escape(str(general['text']))}: base → "
                        f"after each stage: {steps}; drift after the last stage "
                        f"{_fmt((general['drift_pct_per_stage'] or [None])[-1])} %</p>")
    per_task = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(v['zero_shot'])}</td><td>{_fmt(v['final'])}</td>"
        f"<td>{_fmt(v['forgetting'])}</td></tr>" for name, v in metrics["per_task"].items())
    params = metrics["parameters"]
    t = metrics["timings"]
    stages = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(', '.join(s['tasks']))}</td><td>{s['train']['steps']}</td>"
        f"<td>{_fmt(s['train']['final_loss'], 3)}</td><td>{s['train']['tokens_per_s']:.0f}</td>"
        f"<td>{s['train']['seconds']:.1f}</td><td>{s['eval_s']:.1f}</td></tr>"
        for i, s in enumerate(metrics["stages"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>evolora report: {html.escape(metrics['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{background:#f3f3f3}}td:first-child{{text-align:left}}
td.d{{text-align:left;font-size:90%}}
pre{{background:#f7f7f7;padding:1em}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(metrics['name'])}</h1>
<p>method <b>{html.escape(metrics['method'])}</b> · model <b>{html.escape(metrics['model'])}</b> ·
stream <b>{html.escape(metrics['stream']['name'])}</b> (order {metrics['stream']['order']}) · evaluation {metrics['eval_mode']}
{'' if metrics['complete'] else ' · <b>incomplete run</b>'}</p>
<h2>Metrics (points, 0-100)</h2><table><tr><th>metric</th><th>value</th><th>definition</th></tr>{rows}</table>
{interval_html}<p>R[i,j] is task j's accuracy (points) after training stage i.</p>
<h2>Accuracy matrix R</h2>{img(heatmap)}<pre>{html.escape(matrix_text(metrics))}</pre>
<h2>Accuracy over the stream</h2>{img(over_time)}
{general_html}{locate_html}
<h2>Per task</h2><table><tr><th>task</th><th>zero-shot</th><th>final</th><th>forgetting</th></tr>{per_task}</table>
<h2>Training</h2><table><tr><th>stage</th><th>tasks</th><th>steps</th><th>final loss</th><th>tokens/s</th>
<th>train s</th><th>eval s</th></tr>{stages}</table>
{img(loss) if has_loss else ''}
<p>parameters: base {params['base']:,} · trainable {params['trainable']:,} · added {params['added']:,}
({params['added_per_task']:,.0f} per task) · total time {t['total_s']:.0f} s</p>
<h2>Made with</h2><p>{env_text or 'not recorded (a run made before evolora recorded its environment)'}</p>
<h2>Config</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    atomic.write_text(path, page)
    return path
