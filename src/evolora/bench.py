"""Benchmark suites: several runs on one stream with identical data, seeds and budget. Each run's
metrics.json is kept under the suite's results folder; runs whose results exist are skipped, so a suite
can be run method by method across sessions. The results table (docs/RESULTS.md) is rebuilt from those
files only, never typed."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    chosen_on: Optional[str] = None
    """What this run's option values were chosen on (e.g. `order 1 dev`); docs/RESULTS.md says it beside the row."""
    per_order: bool = True
    """False: one run whatever `--orders` asks (joint training does not see the task order, and every order has
    the same test examples); it stands for every order in the paired comparisons."""
    orders: Optional[list[int]] = None
    """The only task orders this entry runs on whatever `--orders` asks (e.g. [1] for full fine-tuning at ~4x a
    LoRA run's cost); the table flags such a row `(order 1 only)` beside rows averaged over more orders."""

    @property
    def name(self) -> str:
        return self.label or "+".join([self.method, *self.addons])


class SuiteChoice(BaseModel):
    """Options a suite compares: the candidate runs' dev AP decides (never their test figures)."""

    model_config = ConfigDict(extra="forbid")
    choose: str
    """What is chosen, in words (e.g. `MoE-CL variant settings`)."""
    candidates: list[str] = Field(min_length=2)
    """Labels of the suite's runs that compete."""
    order: Optional[int] = None
    """The task order whose dev split decides; none: the lowest order every candidate has dev figures for."""


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
    headline: list[str] = Field(default_factory=list)
    """Labels of the headline table (the protocol's methods); the other runs form the Ablations table below it."""
    choices: list[SuiteChoice] = Field(default_factory=list)
    """Option values chosen by dev AP among candidate runs (docs/RESULTS.md shows each decision)."""
    position: int = 100
    """Where the suite's section sits in docs/RESULTS.md: lower first (the benchmark of record: 0), then by name."""

    def table_layout(self) -> dict:
        """What docs/RESULTS.md needs of the suite besides its results files."""
        return {"headline": list(self.headline),
                "chosen_on": {run.name: run.chosen_on for run in self.runs if run.chosen_on},
                "choices": [c.model_dump() for c in self.choices], "position": self.position}

    @model_validator(mode="after")
    def _known_labels(self):
        labels = {run.name for run in self.runs}
        for i, choice in enumerate(self.choices):
            unknown = [c for c in choice.candidates if c not in labels]
            if unknown:
                raise ValueError(f"choices.{i}.candidates: {unknown[0]!r} is not the label of a run of this suite")
        return self

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
        where = f"{field}: " if field else ""  # a check across fields names its field in the message
        raise ConfigError(f"{path}: {where}{first['msg'].removeprefix('Value error, ')}") from None


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
        if only and entry.name not in only or not _runs_on(entry, order):
            continue
        target, run_order = _target(suite_path, suite, entry, order, rerun)
        run_dir = _run_dir(suite, target)
        if target.is_file() and not rerun:
            log(f"[{entry.name}] results exist: {target} (skipped)")
            _backfill_correctness(target, run_dir)
            _backfill_per_order(target, entry.per_order)
            done.append(target)
            continue
        overrides = [f"method.name={entry.method}", f"method.addons={json.dumps(entry.addons)}",
                     f"name={suite.name}-{target.stem}", "output.overwrite=true", *entry.set,
                     *([f"data.order={run_order}"] if run_order is not None else [])]
        source = f"{suite_path} [{entry.name}]"
        config = build_config(_base_for(base, entry.method), overrides, source=source)
        validate_method_options(config.method, source)
        resume = not rerun and can_resume(config, run_dir)
        log(f"[{entry.name}] {'resuming' if resume else 'running into'} {run_dir}")
        metrics = run_stream(config, run_dir, log=lambda m, n=entry.name: log(f"[{n}] {m}"), resume=resume)
        add_final_correctness(metrics, run_dir)
        metrics["bench"] = {"suite": suite.name, "label": entry.name, "overrides": overrides,
                            "command": " ".join(["evolora", *sys.argv[1:]]) or "evolora bench",
                            "date": datetime.date.today().isoformat(), "machine": machine_description(),
                            **({} if entry.per_order else {"per_order": False})}
        atomic.write_json(target, metrics)
        done.append(target)
    return done


def _run_dir(suite: Suite, target: Path) -> Path:  # the run folder behind a results file
    return Path(suite.runs_dir) / suite.name / target.stem


def _runs_on(entry: SuiteRun, order: Optional[int]) -> bool:
    return order is None or not entry.orders or order in entry.orders


def _target(suite_path: Path, suite: Suite, entry: SuiteRun, order: Optional[int], rerun: bool = False):
    """(the entry's results file for `order`, the order it runs on: None = the base config's)."""
    run_order = order if entry.per_order else None
    target = result_path(suite_path, suite, entry, run_order)
    plain = result_path(suite_path, suite, entry)
    if run_order is not None and not target.is_file() and plain.is_file() \
            and json.loads(plain.read_text(encoding="utf-8"))["stream"].get("order") == run_order:
        target = plain  # made without --orders, on the base config's order: the same run (--rerun replaces it)
    return target, run_order


def _selected(suite_path: Path, suite: Suite, only, orders):
    """(entry, results file, order it runs on) of each run a `bench` call with these labels and orders selects,
    each results file once."""
    seen = set()
    for order in orders or [None]:
        for entry in suite.runs:
            if only and entry.name not in only or not _runs_on(entry, order):
                continue
            target, run_order = _target(suite_path, suite, entry, order)
            if target not in seen:
                seen.add(target)
                yield entry, target, run_order


def plan_suite(suite_path: Path, only: Optional[list[str]] = None, orders: Optional[list[int]] = None
               ) -> list[tuple[str, Optional[int], Optional[float], Optional[str], Optional[tuple[float, float]]]]:
    """The runs a `bench` call would make: (label, order, minutes, source, span). Minutes: the most the label took
    on another order or seed of this suite (source, span None), else scaled from a suite beside it (source: its
    name; span: (low, high); `_scaled_minutes`), else None. Nothing runs."""
    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    folder = suite_path.parent / suite.results / suite.name
    todo = []
    for entry, target, run_order in _selected(suite_path, suite, only, orders):
        if not target.is_file():
            known = _label_minutes(folder, entry.name)
            minutes, source, span = (max(known), None, None) if known else _scaled_minutes(suite_path, suite, entry.name)
            todo.append((entry.name, run_order, minutes, source, span))
    return todo


def _label_minutes(folder: Path, label: str) -> list[float]:
    return [json.loads(p.read_text(encoding="utf-8"))["timings"]["total_s"] / 60 for p in label_results(folder, label)]


def _scaled_minutes(suite_path: Path, suite: Suite, label: str):
    """(minutes, source suite, (low, high)): the label's minutes in the first suite beside this one that has run
    it and shares finished labels with it, times the median of (mean minutes here / there) over those labels;
    low and high take the smallest and largest ratio (methods scale differently: long15/MTL5 is 1.2x-3.5x)."""
    import statistics

    folder = suite_path.parent / suite.results / suite.name
    for other_path in sorted(p for p in suite_path.parent.glob("*_suite.yaml") if p.resolve() != suite_path.resolve()):
        try:
            other = load_suite(other_path)
        except ConfigError:
            continue  # a broken neighbour gives no estimate; this suite's plan still stands
        there = other_path.parent / other.results / other.name
        theirs = _label_minutes(there, label)
        ratios = [statistics.mean(mine) / statistics.mean(shared)
                  for name in dict.fromkeys(run.name for run in suite.runs)
                  if (mine := _label_minutes(folder, name)) and (shared := _label_minutes(there, name))]
        if theirs and ratios:
            return max(theirs) * statistics.median(ratios), other.name, (max(theirs) * min(ratios), max(theirs) * max(ratios))
    return None, None, None


def stale_results(suite_path: Path, only: Optional[list[str]] = None,
                  orders: Optional[list[int]] = None) -> list[tuple[str, Optional[int], list[str]]]:
    """Results files of the selected runs made before figures the protocol now reads: (label, order, what is
    missing: per-example correctness for the paired intervals, the knowledge probe, dev figures of a choice's
    candidate)."""
    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    candidates = {c for choice in suite.choices for c in choice.candidates}
    stale = []
    for entry, target, run_order in _selected(suite_path, suite, only, orders):
        if not target.is_file():
            continue
        metrics = json.loads(target.read_text(encoding="utf-8"))
        wanted = [("per-example correctness", "final_correct"), ("knowledge", "knowledge")]
        if entry.name in candidates:
            wanted.append(("dev figures", "dev"))
        missing = [what for what, key in wanted if not metrics.get(key)]
        if missing:
            stale.append((entry.name, metrics["stream"].get("order", run_order), missing))
    return stale


def backfill_knowledge(suite_path: Path, only: Optional[list[str]] = None, orders: Optional[list[int]] = None,
                       log=print) -> list[Path]:
    """Results files of the selected runs made before evolora kept the knowledge probe's per-question
    correctness get it from their finished run folders: the final model is loaded and the probe measured again
    (minutes a run); it is written only where the probe's accuracy equals the one the results file recorded."""
    from evolora.reload import run_knowledge

    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    filled = []
    for entry, target, _ in _selected(suite_path, suite, only, orders):
        metrics = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
        knowledge = metrics.get("knowledge") or {}
        run_dir = _run_dir(suite, target)
        if not knowledge.get("per_stage") or knowledge.get("final_correct"):
            continue
        if not (run_dir / "config.yaml").is_file():
            log(f"[{entry.name}] {target.name}: no run folder at {run_dir} (skipped)")
            continue
        measured = run_knowledge(run_dir)
        recorded = knowledge["per_stage"][-1]["mean"]
        if abs(measured["mean"] - recorded) > 1e-9:
            log(f"[{entry.name}] {target.name}: the probe gives {measured['mean']:.2f} %, the run recorded "
                f"{recorded:.2f} % (not written)")
            continue
        knowledge["final_correct"] = measured["correct"]
        atomic.write_json(target, metrics)
        log(f"[{entry.name}] {target.name}: knowledge per question kept ({recorded:.1f} %, as recorded)")
        filled.append(target)
    return filled


def add_final_correctness(metrics: dict, run_dir: Path) -> None:
    """The final model's per-example correctness ("0"/"1" per test example, per task) goes into the results file,
    with task ids given and, for methods with a locator, located: the paired intervals of docs/RESULTS.md need it."""
    from evolora.report.run import predictions_path, read_correctness, read_final_predictions
    from evolora.report.tables import pack_correct

    oracle = read_final_predictions(run_dir, metrics)
    if oracle:
        metrics["final_correct"] = pack_correct(oracle)
    located = predictions_path(run_dir, "final-located")
    if metrics.get("locate") and located.is_file():
        metrics["locate"]["final_correct"] = pack_correct(read_correctness(located))


def _backfill_correctness(target: Path, run_dir: Path) -> None:
    """A results file written before results kept per-example correctness gets it from its own run folder (the
    folder's metrics.json must give the same R)."""
    from evolora.runfolder import METRICS, read_json

    metrics = read_json(target, "results file")
    if "final_correct" in metrics or not (run_dir / METRICS).is_file():
        return
    if read_json(run_dir / METRICS, "metrics.json").get("R") != metrics.get("R"):
        return
    add_final_correctness(metrics, run_dir)
    if "final_correct" in metrics:
        atomic.write_json(target, metrics)


def _backfill_per_order(target: Path, per_order: bool) -> None:
    """A results file of an order-free entry (per_order false) made before the suite said so gets the mark the
    paired comparisons read."""
    from evolora.runfolder import read_json

    metrics = read_json(target, "results file")
    if per_order or "bench" not in metrics or metrics["bench"].get("per_order") is False:
        return
    metrics["bench"]["per_order"] = False
    atomic.write_json(target, metrics)


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
    from evolora.models import environment

    return environment()["machine"]


def label_results(folder: Path, label: str) -> list[Path]:
    """A label's results files in a suite's results folder: made without --orders, and one per order."""
    stem = file_stem(label)
    mine = [p for p in Path(folder).glob("*.json") if p.stem == stem or p.stem.startswith(stem + "-order")]

    def order(path: Path) -> tuple[int, str]:  # the file made without --orders first, then by order number
        tail = path.stem[len(stem) + len("-order"):]
        return int(tail) if tail.isdigit() else -1, path.name

    return sorted(mine, key=order)


def all_result_files(results_root: Path, suite_path: Optional[Path] = None) -> list[Path]:
    """Every results file under the root; those of `suite_path` first, in the suite's order."""
    files = sorted(Path(results_root).glob("*/*.json"))
    if suite_path is None:
        return files
    suite = load_suite(Path(suite_path))
    folder = Path(results_root) / suite.name
    first = [p for entry in suite.runs for p in label_results(folder, entry.name)]
    return first + [p for p in files if p not in first]
