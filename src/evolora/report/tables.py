"""docs/RESULTS.md: one row per benchmark result (or mean ± std over task orders), built from results files."""

from __future__ import annotations

import json
from pathlib import Path

from evolora import atomic


COLUMNS = ["method", "AP", "Avg", "BWT", "FWT", "drift", "knowledge", "locator", "params/task", "minutes"]


def _cell(value, digits=1) -> str:
    if value is None:
        return ""
    return f"{value:.1e}" if abs(value) >= 1e6 else f"{value:.{digits}f}"  # a diverged run's drift stays readable


def _on_gpu(metrics: dict) -> bool:
    """Whether the bench made this run on a GPU (its machine line names the device; a CPU's starts "CPU")."""
    machine = metrics.get("bench", {}).get("machine", "")
    return bool(machine) and not machine.startswith("CPU")


def _minutes(runs: list[dict]) -> str:
    """The minutes cell: one run's, or mean ± std over runs; "GPU" after it where the runs were made on one,
    "GPU and CPU" where they mixed (a mean over both kinds measures neither)."""
    cell = _mean_std([r["timings"]["total_s"] / 60 for r in runs])
    gpu = sum(_on_gpu(r) for r in runs)
    return cell if not gpu else f"{cell} GPU" if gpu == len(runs) else f"{cell} GPU and CPU"


def table_rows(metrics: dict, note: str = "") -> list[list[str]]:
    """One row per run; a run evaluated with located task ids as well gives `label (oracle)` and
    `label (locate)` (the latter from the final model only, so only AP and the locator's accuracy). `note` goes
    in the label's brackets (e.g. `order 1 only`)."""
    m = metrics.get("metrics", {})
    label = metrics.get("bench", {}).get("label") or metrics["method"]
    params = metrics.get("parameters", {}).get("added_per_task")
    params_cell = f"{params:,.0f}" if params is not None else ""
    minutes = _minutes([metrics])
    locate = metrics.get("locate")

    def named(kind: str) -> str:
        inside = ", ".join(x for x in (kind, note) if x)
        return f"{label} ({inside})" if inside else label

    first = [named("oracle" if locate else ""), _cell(m.get("AP")), _cell(m.get("Avg")), _cell(m.get("BWT")),
             _cell(m.get("FWT")), _cell(m.get("drift_pct")), _cell(m.get("knowledge_pts")), "", params_cell, minutes]
    if not locate:
        return [first]
    return [first, [named("locate"), _cell(locate["AP"]), "", "", "", "", "", _cell(locate["locator"]), params_cell,
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
        return _cell(mean)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{_cell(mean)} ± {_cell(std)}"  # a diverged run's drift stays readable here too


def _params_over_orders(values: list) -> str:
    """Parameters added per task over task orders: one figure when every order adds the same (most methods),
    the mean (and range) where the method sizes itself per order (CMoE's probe-guided expansion)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(set(values)) == 1:
        return f"{values[0]:,.0f}"
    return f"{sum(values) / len(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def aggregated_rows(label: str, runs: list[dict], beside_means: bool = False) -> list[list[str]]:
    """A label's row(s): its run's, or mean ± std over its runs on several task orders. `beside_means`: other
    rows of the table are means over orders, so a single-order row says which order it is (unless its run
    stands for every order: `per_order: false`)."""
    if len(runs) == 1:
        run = runs[0]
        single = beside_means and run.get("bench", {}).get("per_order", True)
        return table_rows(run, f"order {run['stream'].get('order')} only" if single else "")

    def col(key):
        return _mean_std([r.get("metrics", {}).get(key) for r in runs])

    params_cell = _params_over_orders([r.get("parameters", {}).get("added_per_task") for r in runs])
    minutes = _minutes(runs)
    located = [r["locate"] for r in runs if r.get("locate")]
    name = f"{label} ({len(runs)} orders)"
    rows = [[name.replace(" (", " (oracle, ", 1) if located else name, col("AP"), col("Avg"), col("BWT"), col("FWT"),
             col("drift_pct"), col("knowledge_pts"), "", params_cell, minutes]]
    if located:
        rows.append([f"{label} (locate, {len(located)} orders)", _mean_std([x["AP"] for x in located]), "", "", "",
                     "", "", _mean_std([x["locator"] for x in located]), params_cell, minutes])
    return rows


def _orders(groups: list[dict]) -> list[str]:
    """The task orders the runs of these label groups were made on, sorted."""
    return sorted({str(m["stream"].get("order")) for g in groups for m in g["runs"]})


def results_markdown(result_files: list[Path], layouts: dict | None = None) -> str:
    """The tables of docs/RESULTS.md. `layouts` (suite name -> Suite.table_layout()) splits a suite's rows into
    its headline table and an Ablations table, and says where each run's options were chosen."""
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
             "fine-tuning adds none: it changes the base weights; the mean and range over orders where a method sizes",
             "itself per order, as CMoE does); `minutes` is the run's wall time including evaluation, on",
             "the machine the Runs list names for it; a row made on a GPU says `GPU` after its minutes (they are",
             "not comparable with a CPU row's).", ""]
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body, notes = [], []
    layouts = layouts or {}
    # sections by the suites' `position`, then name; results without a suite file (older folders) go last
    ranked = sorted(by_suite.items(), key=lambda item: (layouts.get(item[0], {}).get("position", 1000), item[0]))
    for suite, runs in ranked:
        body += ["", f"## {suite}", ""]
        note = next((m["bench"]["note"] for m in runs if m.get("bench", {}).get("note")), None)
        if note:
            body += [f"Every row here was {note}.", ""]
        layout = layouts.get(suite, {})
        headline = set(layout.get("headline", []))
        groups = _aggregate(runs)
        tables = [("", groups)]
        if headline:
            rest = [g for g in groups if g["label"] not in headline]
            tables = [("", [g for g in groups if g["label"] in headline]),
                      (f"### Ablations (order {', '.join(_orders(rest))})", rest)]
        absent = [label for label in layout.get("headline", []) if label not in {g["label"] for g in groups}]
        for title, chosen in tables:
            if chosen:
                means = max(len(g["runs"]) for g in chosen) > 1
                shown = _orders(chosen)
                if not title and not means and len(shown) == 1:  # no order of a headline averaged yet: say which
                    body += [f"One task order so far (order {shown[0]}): no mean or spread over orders yet.", ""]
                body += ([title, ""] if title else []) + [header, rule]
                for group in chosen:
                    body += ["| " + " | ".join(row) + " |"
                             for row in aggregated_rows(group["label"], group["runs"], beside_means=means)]
                body += [""]
            if not title and absent:
                body += ["Not run yet (headline methods without a results file): "
                         + ", ".join(f"`{label}`" for label in absent) + ".", ""]
        decided, choice_lines = choices_section(runs, layout.get("choices", []))
        body += choice_lines
        # a suite's own note (settings a dev choice did not cover) stays beside the decision
        chosen_on = dict(layout.get("chosen_on", {}))
        for label, where in decided.items():
            chosen_on[label] = f"{where}; {chosen_on[label]}" if label in chosen_on else where
        if chosen_on:
            body += ["Where option values were chosen:", ""] + [f"- `{label}`: chosen on {where}"
                                                              for label, where in chosen_on.items()] + [""]
        body += paired_section(runs)
        if headline:
            body += ablation_section({g["label"]: g["runs"] for g in groups}, [g["label"] for g in rest])
        for metrics in runs:
            b = metrics.get("bench", {})
            stream = metrics["stream"]
            notes.append(f"- `{b.get('label', metrics['method'])}` ({suite}): {stream['name']} order {stream['order']}"
                         f" ({' → '.join(stream['tasks'])}), model {metrics['model']}; {b.get('date', '')} on "
                         f"{b.get('machine', '')}; `{b.get('command', '')}`")
    return "\n".join(lines + body + ["", "Runs:", ""] + notes) + "\n"


def choices_section(runs: list[dict], choices: list[dict]) -> tuple[dict[str, str], list[str]]:
    """Each suite choice decided by the candidates' dev AP on one order (test figures shown beside, never used):
    ({chosen label: where it was chosen}, the section's lines)."""
    if not choices:
        return {}, []
    by_label = {g["label"]: {m["stream"].get("order"): m for m in g["runs"]} for g in _aggregate(runs)}
    decided, lines = {}, ["### Choices made on dev data", "",
                          "Each choice goes to the candidate with the highest dev AP (a dev split carved from train) on "
                          "one task order; the test AP is shown beside it and plays no part.", ""]
    for choice in choices:
        candidates = choice["candidates"]
        with_dev = [{o for o, m in by_label.get(c, {}).items() if (m.get("dev") or {}).get("AP") is not None}
                    for c in candidates]
        common = set.intersection(*with_dev)
        order = choice.get("order") if choice.get("order") is not None else \
            min(common or set.union(*with_dev), key=str, default=None)
        if order not in common:
            missing = [c for c, orders in zip(candidates, with_dev) if order not in orders or order is None]
            where = f" on order {order}" if order is not None else ""
            why = "has no dev figures" + where + " (run it with data.dev_per_label > 0)" \
                if by_label.get(missing[0]) else "is not run yet" + where
            lines += [f"- **{choice['choose']}**: not decided yet: `{missing[0]}` {why}.", ""]
            continue
        dev = {c: by_label[c][order]["dev"]["AP"] for c in candidates}
        best = max(candidates, key=lambda c: dev[c])
        decided[best] = f"order {order} dev ({choice['choose']}: {len(candidates)} candidates)"
        lines += [f"**{choice['choose']}**: chosen `{best}` on order {order} dev.", "",
                  f"| candidate | dev AP (order {order}) | test AP (order {order}) | test AP (other orders) |",
                  "|---|---|---|---|"]
        for c in candidates:
            others = [m.get("metrics", {}).get("AP") for o, m in by_label.get(c, {}).items() if o != order]
            lines.append(f"| {c}{' (chosen)' if c == best else ''} | {dev[c]:.1f} | "
                         f"{_cell(by_label[c][order].get('metrics', {}).get('AP'))} | {_mean_std(others)} |")
        lines.append("")
    return decided, lines


def write_results(result_files: list[Path], out: Path, layouts: dict | None = None) -> Path:
    atomic.write_text(out, results_markdown(result_files, layouts))
    return out


def pack_correct(correct: dict[str, list[bool]]) -> dict[str, str]:
    """Per-example correctness as one "0"/"1" string per task (how results files keep it)."""
    return {task: "".join("1" if c else "0" for c in values) for task, values in correct.items()}


def unpack_correct(bits: dict[str, str]) -> dict[str, list[bool]]:
    return {task: [c == "1" for c in values] for task, values in bits.items()}


REFERENCES = ("seq_lora", "replay", "multitask")
"""The rows every other row's AP is compared with (when the suite has them and both kept their predictions)."""


def _final(metrics: dict) -> dict | None:
    return metrics.get("final_correct")


def _located(metrics: dict) -> dict | None:
    return (metrics.get("locate") or {}).get("final_correct")


def _knowledge(metrics: dict) -> dict | None:
    return (metrics.get("knowledge") or {}).get("final_correct")


def _correct_by_order(runs: list[dict], pick) -> dict[object, dict[str, str]]:
    """Per task order: task -> per-example correctness ("0"/"1" per example) as `pick` reads it from a run."""
    out = {}
    for metrics in runs:
        bits = pick(metrics)
        if bits:
            out[metrics["stream"].get("order")] = bits
    return out


def _pooled(reference: dict, other: dict, any_order: bool = False, other_any_order: bool = False) \
        -> tuple[dict, dict] | None:
    """Both runs' correctness on the same (order, task, example)s, pooled over the orders both have. A run that
    does not depend on the order (`any_order` for the reference, `other_any_order` for the other: a suite run
    with per_order false, e.g. multitask) stands for every order of the run it is compared with."""
    if any_order and len(reference) == 1:
        only = next(iter(reference.values()))
        reference = {order: only for order in other}
    elif other_any_order and len(other) == 1:
        only = next(iter(other.values()))
        other = {order: only for order in reference}
    orders = sorted(set(other) & set(reference), key=str)
    a, b = {}, {}
    for order in orders:
        mine, theirs = other[order], reference[order]
        if mine.keys() != theirs.keys() or any(len(mine[t]) != len(theirs[t]) for t in mine):
            return None
        mine_bool, theirs_bool = unpack_correct(mine), unpack_correct(theirs)
        for task in mine:
            a[f"{order}:{task}"] = theirs_bool[task]
            b[f"{order}:{task}"] = mine_bool[task]
    return (a, b) if a else None


def _order_free(group: list[dict]) -> bool:
    """Runs of a suite entry with per_order false (joint training): one run stands for every task order."""
    return all(r.get("bench", {}).get("per_order") is False for r in group)


def paired_section(runs: list[dict]) -> list[str]:
    """Each row's AP, and its general knowledge after the last stage, against seq_lora, replay and multitask:
    the difference and its 95 % paired-bootstrap interval over the same examples (test examples; the knowledge
    probe's questions), pooled over the task orders both have."""
    groups = {g["label"]: g["runs"] for g in _aggregate(runs)}
    ap = _paired_table(groups, [("oracle", _final), ("locate", _located)],
                       "AP against {refs}: the difference (points) and its 95 % paired-bootstrap interval over the same "
                       "test examples, pooled over the orders both have (a cell names them when they are fewer than the "
                       "row's). An interval that crosses zero is no measurable difference at this budget.")
    knowledge = _paired_table(groups, [("", _knowledge)],
                              "General knowledge after the last stage against {refs}: the difference (points; the base "
                              "model is the same, so it is also the difference of the `knowledge` change) and its 95 % "
                              "paired-bootstrap interval over the same questions, pooled over the orders both have. "
                              "Runs made before evolora kept each question's correctness have no cell.")
    return ap + knowledge


def _paired_table(groups: dict[str, list[dict]], picks: list, title: str) -> list[str]:
    """Rows of differences against the REFERENCES for each way `picks` reads a run's correctness (a kind name and
    a reader: the final model with task ids given or located, or the knowledge probe)."""
    from evolora.metrics import paired_ap_bootstrap

    references = {name: _correct_by_order(groups[name], picks[0][1]) for name in REFERENCES if name in groups}
    references = {name: bits for name, bits in references.items() if bits}
    if not references:
        return []
    order_free = {label: _order_free(group) for label, group in groups.items()}
    rows = []
    for label, group in groups.items():
        for kind, pick in picks:
            mine = _correct_by_order(group, pick)
            if not mine:
                continue
            cells = []
            for name, reference in references.items():
                pair = None if name == label and pick is picks[0][1] else \
                    _pooled(reference, mine, order_free[name], order_free[label])
                if pair is None:
                    cells.append("")
                    continue
                p = paired_ap_bootstrap(*pair)
                pooled = sorted({key.split(":", 1)[0] for key in pair[0]})
                named = order_free[label] or len(pooled) < len(mine)  # an order-free row has no orders of its own
                cells.append(_interval(p) + (f" (order {', '.join(pooled)})" if named else ""))
            if any(cells):
                kind_cell = f"{kind}, " if kind and group[0].get("locate") else ""
                runs_orders = len({r["stream"].get("order") for r in group})  # with or without per-example figures
                count = "one run for every order" if order_free[label] else \
                    f"{len(mine)}{f' of {runs_orders}' if len(mine) < runs_orders else ''} order{'s' if runs_orders > 1 else ''}"
                rows.append(f"| {label} ({kind_cell}{count}) | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", title.format(refs=", ".join(references)), "",
            "| method | " + " | ".join(f"vs {name}" for name in references) + " |",
            "|---|" + "|".join("---" for _ in references) + "|", *rows]


def _interval(p: dict) -> str:
    """A paired-bootstrap difference and its 95 % interval, as a table cell."""
    return f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"


def _varied(label: str, labels) -> str | None:
    """The row an ablation varies: its label less its last `/` parts, the longest such label a row has."""
    while "/" in label:
        label = label.rsplit("/", 1)[0]
        if label in labels:
            return label
    return None


def ablation_section(groups: dict[str, list[dict]], ablations: list[str]) -> list[str]:
    """Each ablation row against the row it varies (`_varied`): the AP and general-knowledge differences with
    95 % paired-bootstrap intervals over the same test examples and questions, on the orders both have."""
    from evolora.metrics import paired_ap_bootstrap

    rows = []
    for label in ablations:
        varied = _varied(label, groups)
        if varied is None:
            continue
        cells, orders = [], set()
        for pick in (_final, _knowledge):
            pair = _pooled(_correct_by_order(groups[varied], pick), _correct_by_order(groups[label], pick),
                           _order_free(groups[varied]), _order_free(groups[label]))
            if pair is None:
                cells.append("")
                continue
            p = paired_ap_bootstrap(*pair)
            orders |= {key.split(":", 1)[0] for key in pair[0]}
            cells.append(_interval(p))
        if any(cells):
            rows.append(f"| {label} | {varied} | {', '.join(sorted(orders))} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Each ablation against the row it varies: the difference (points) of AP and of general knowledge "
            "after the last stage, with its 95 % paired-bootstrap interval over the same test examples and questions "
            "on the orders both have. An interval that crosses zero is no measurable difference at this budget.", "",
            "| ablation | against | orders | AP | knowledge |", "|---|---|---|---|---|", *rows]
