"""The command line: run, eval, predict, export, report, compare, bench, demo. User errors print one line and exit 2."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer

from evolora.errors import EvoloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual instruction tuning of LLMs.")

SET_HELP = "Override a config field, e.g. --set train.lr=2e-4 (repeatable)."
TRUST_HELP = "Run the model's own code (model.trust_remote_code) even though the run folder came from elsewhere."
PICKLE_HELP = "Load pickle (*.bin) weights, which can run code; a run folder's config cannot turn this on."


def _echo(message: str) -> None:
    typer.echo(message)


def _version(value: bool) -> None:
    if value:
        from evolora import __version__

        typer.echo(f"evolora {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print evolora's version and exit.")) -> None:
    """Continual instruction tuning of LLMs."""


@app.command()
def run(config: Path = typer.Argument(..., help="YAML run config."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: output.dir or runs/NAME)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder after a crash."),
        ) -> None:
    """Train a method over a task stream, evaluating every task after every stage."""
    from evolora.config import load_config
    from evolora.engine import run as run_stream
    from evolora.methods import validate_method_options

    cfg = load_config(config, set_ or [])
    validate_method_options(cfg.method, str(config))
    run_dir = resume or out or cfg.run_dir()
    metrics = run_stream(cfg, run_dir, log=_echo, resume=resume is not None)
    import torch.distributed
    from accelerate import PartialState

    state = PartialState()  # already set up by the run
    if state.is_main_process:
        _finish(metrics, run_dir)
    if torch.distributed.is_initialized():
        # a rank that exits while the process group lives can abort in gloo's teardown
        # ("terminate called without an active exception"): leave together, group closed
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()


def _finish(metrics: dict, run_dir: Path) -> None:
    from evolora.report import matrix_text, summary_text

    _echo("\nAccuracy matrix R (%):\n" + matrix_text(metrics))
    _echo(summary_text(metrics))
    _echo(f"report: {Path(run_dir) / 'report.html'}")


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="A finished run folder."),
          mode: Optional[str] = typer.Option(None, help="loglik | generate (default: the run's)."),
          task_id: Optional[str] = typer.Option(None, "--task-id", help="Expert methods: oracle | locate "
                                                "(default: the run's)."),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE over the run's config; "
                                                   "method.options.locator* refits the task locator, "
                                                   "method.options.reassign* (moe_cl) reassigns experts."),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
          allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
          knowledge: bool = typer.Option(False, "--knowledge", help="Also measure the run's general-knowledge "
                                         "probe (eval.general_tasks), with each question's correctness."),
          ) -> None:
    """Re-evaluate a finished run's final model on every task of its stream."""
    from evolora.reload import evaluate_run

    overrides = ([f"eval.mode={mode}"] if mode else []) + ([f"eval.task_id={task_id}"] if task_id else []) \
        + list(set_ or [])
    result = evaluate_run(run_dir, overrides, trust_remote_code, allow_pickle, knowledge)
    located = result.get("locator_per_task", {})
    for name, acc in result["accuracy"].items():
        _echo(f"{name:>24}  {acc:6.1f}" + (f"   located {located[name]:5.1f} %" if name in located else ""))
    if "locator" in result:
        _echo(f"locator accuracy {result['locator']:.1f} % ("
              + ", ".join(f"{k} {v:.1f} %" for k, v in result["locator_by_kind"].items()) + ")")
    moved = {t: e for t, e in result.get("answerer", {}).items() if t != e}
    if moved:
        _echo("reassigned: " + ", ".join(f"{t} answered by {e}" for t, e in moved.items()))
    if "knowledge" in result:
        _echo(f"general knowledge {result['knowledge']['mean']:.1f} %")
    _echo(f"mean {result['mean']:.2f}  (written to {Path(run_dir) / 'eval.json'})")


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="A finished run folder."),
            text: Optional[List[str]] = typer.Option(None, "--text", help="An input (repeatable)."),
            file: Optional[Path] = typer.Option(None, "--file", help="JSONL rows with `input` (and optionally "
                                                "`instruction`), or a text file with one input per line."),
            task: Optional[str] = typer.Option(None, "--task", help="Answer as this task (default: locate it)."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
            allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
            ) -> None:
    """Answer new inputs with a finished run's model; expert methods locate the task themselves."""
    import json

    from evolora.data.tasks import Example
    from evolora.reload import predict as predict_inputs
    from evolora.reload import read_inputs

    examples = [Example(t, "") for t in text or []] + (read_inputs(file) if file else [])
    if not examples:
        raise EvoloraError("predict: give inputs with --text or --file")
    for row in predict_inputs(run_dir, examples, task, trust_remote_code, allow_pickle):
        _echo(json.dumps(row, ensure_ascii=False) if as_json else f"[{row['task']}] {row['answer']}\t{row['input'][:80]}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished run folder."),
           out: Path = typer.Option(..., "--out", help="The folder to write (new, or empty)."),
           stage: Optional[int] = typer.Option(None, "--stage", help="Export the model after this stage (1-based; "
                                               "needs output.keep_checkpoints: all). Default: the last."),
           task: Optional[str] = typer.Option(None, "--task", help="The task whose answer is exported "
                                              "(per_task_lora: required)."),
           merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base weights: a plain "
                                      "Hugging Face model folder."),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
           allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
           ) -> None:
    """Write a finished run's model as a PEFT adapter folder (or, with --merge, a plain model folder)."""
    from evolora.export import export_run

    record = export_run(run_dir, out, stage, task, merge, trust_remote_code, allow_pickle)
    what = {"adapter": f"PEFT adapter (rank {record.get('rank')}) for {record['base_model']}",
            "merged": f"{record['base_model']} with the adapter merged", "model": "the fine-tuned model"}[record["form"]]
    _echo(f"{out}: {what}, {record['method']} after stage {record['stage']}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder with metrics.json.")) -> None:
    """(Re)build report.html and the plots of a run."""
    from evolora.report import write_report

    _echo(str(write_report(run_dir)))


@app.command()
def demo(method: str = typer.Option("seq_lora", help="Method to run: seq_ft, seq_lora, multitask, replay, ewc, lwf, "
                                    "olora, per_task_lora, moe_cl, cmoe."),
         data_root: Optional[Path] = typer.Option(None, "--data-root",
                                                  help="Benchmark folder: run mtl5 on it instead."),
         out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/demo)."),
         set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
         ) -> None:
    """The main job: a continual run on the embedded SmolLM2, offline, in minutes on a CPU."""
    from evolora.config import build_config, load_yaml
    from evolora.engine import run as run_stream

    name = "mtl5_demo.yaml" if data_root else "demo.yaml"
    path = resources.files("evolora") / "configs" / name
    overrides = [f"method.name={method}", "output.overwrite=true"] + (set_ or [])
    if data_root:
        overrides.append(f"data.root={data_root}")
    cfg = build_config(load_yaml(Path(str(path))), overrides, source=name)
    run_dir = out or cfg.run_dir()
    _finish(run_stream(cfg, run_dir, log=_echo), run_dir)


@app.command()
def bench(suite: Path = typer.Argument(..., help="Suite YAML (base config + list of runs)."),
          only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these labels (repeatable)."),
          headline: bool = typer.Option(False, "--headline", help="Only the suite's headline labels (its protocol)."),
          orders: Optional[str] = typer.Option(None, "--orders", help="Task orders to run, e.g. 1,2,3 (mean ± std)."),
          results_md: Path = typer.Option(Path("docs/RESULTS.md"), "--results-md",
                                          help="Table rebuilt from every results file of the suite's folder."),
          table_only: bool = typer.Option(False, "--table-only", help="Run nothing; rebuild the table only."),
          plan: bool = typer.Option(False, "--plan", help="Run nothing; list the runs still to make, with the "
                                    "minutes each took on another order (or, scaled, in a suite beside it) where known."),
          rerun: bool = typer.Option(False, "--rerun", help="Run the selected labels again from scratch, replacing "
                                     "their results and run folders (after a change to a method's code)."),
          backfill_knowledge: bool = typer.Option(False, "--backfill-knowledge", help="Run nothing new; give finished "
                                                  "runs' results files the knowledge probe's per-question correctness, "
                                                  "measured again from their run folders (minutes a run)."),
          ) -> None:
    """Run a benchmark suite (skipping runs whose results exist), rebuild the results table and plots."""
    import json

    from evolora.bench import all_result_files, load_suite, run_suite
    from evolora.report.compare import compare
    from evolora.report.tables import unpack_correct, write_results

    try:
        order_list = [int(x) for x in orders.split(",")] if orders else None
    except ValueError:
        raise EvoloraError(f"--orders: expected comma-separated integers, got {orders!r}") from None
    if headline:
        only = list(only or []) + load_suite(suite).headline
    if plan:
        from evolora.bench import plan_suite, stale_results

        todo = plan_suite(suite, only, order_list)
        for label, order, minutes, source, span in todo:
            _echo(f"{label}  order {order if order is not None else 'base'}  "
                  + (f"~{minutes:.0f} min" if minutes is not None else "minutes unknown")
                  + (f" (its {source} minutes, scaled by the labels both suites have run: {span[0]:.0f}-{span[1]:.0f}"
                     " min under their smallest and largest ratio)" if source else ""))
        known = sum(m for _, _, m, _, _ in todo if m is not None)
        _echo(f"{len(todo)} runs to make; {known:.0f} min where known or estimated, on the machines that made them")
        for label, order, missing in stale_results(suite, only, order_list):
            _echo(f"made before the protocol's figures: {label} order {order} has no {', '.join(missing)} "
                  f"(run it again with --only {label} --rerun{f' --orders {order}' if order_list else ''})")
        return
    if backfill_knowledge:
        from evolora.bench import backfill_knowledge as backfill

        backfill(suite, only, order_list, log=_echo)
    elif not table_only:
        if rerun and not only:
            raise EvoloraError("--rerun: name the runs to redo with --only (it would otherwise redo the whole suite)")
        run_suite(suite, only, log=_echo, orders=order_list, rerun=rerun)
    spec = load_suite(suite)
    root = suite.parent / spec.results
    # the table covers every suite with results under this root: each suite file beside this one lays out its own
    # rows, in its own run order; folders without a suite file (older results) follow
    suites = {suite: spec} | {path: load_suite(path) for path in sorted(suite.parent.glob("*_suite.yaml"))
                              if path != suite}
    by_suite = {path: [p for p in all_result_files(root, path) if p.parent == root / other.name]
                for path, other in suites.items()}
    files = [p for mine in by_suite.values() for p in mine]
    files += [p for p in all_result_files(root) if p not in files]
    _echo(f"results table: {write_results(files, results_md, {s.name: s.table_layout() for s in suites.values()})} "
          f"({len(files)} runs)")
    for path, mine in by_suite.items():  # each suite's comparison holds that suite's finished runs only
        if not mine:
            continue
        results = [json.loads(p.read_text(encoding="utf-8")) for p in mine]
        kept = [unpack_correct(r["final_correct"]) if r.get("final_correct")
                else None for r in results]  # AP intervals on the bars where a result kept its correctness
        plots = compare(results, root / suites[path].name / "comparison", kept)
        _echo(f"comparison ({suites[path].name}): " + ", ".join(str(p) for p in plots.values()))


@app.command("compare")
def compare_(run_dirs: List[Path] = typer.Argument(..., help="Finished run folders."),
             out: Path = typer.Option(Path("comparison"), "--out", help="Folder for the table and plots.")) -> None:
    """Side-by-side table (Markdown + JSON) and plots of finished runs; where the runs kept their
    predictions, each run's AP against the first run's with a paired-bootstrap interval."""
    from evolora.report.compare import compare
    from evolora.report import read_final_predictions, read_metrics

    metrics = [read_metrics(d) for d in run_dirs]
    paths = compare(metrics, out, [read_final_predictions(d, m) for d, m in zip(run_dirs, metrics)])
    _echo(paths["markdown"].read_text())
    _echo(f"plots: {paths['bars']}, {paths['heatmaps']}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except EvoloraError as exc:
        from evolora.engine import Interrupted

        typer.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(130 if isinstance(exc, Interrupted) else 2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a path the user named: unwritable, read-only, a file where a folder goes, disk full
        from evolora.errors import EvoloraError as Line

        where = exc.filename or "a file"
        typer.echo("error: " + str(Line(f"{where}: {exc.strerror or type(exc).__name__}")), err=True)
        sys.exit(2)
    except RecursionError:
        typer.echo("error: an input is nested too deeply", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # Usage errors of the CLI parser (typer bundles its own click): print them the parser's way.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code or 2)
        raise


if __name__ == "__main__":
    main()
