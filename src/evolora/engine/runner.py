"""The run, top to bottom: load the stream and the model, let the method shape the model, evaluate
zero-shot, then for each stage: grow -> before_stage -> train -> after_stage -> checkpoint -> evaluate.
The loop calls the method's declared hooks and never names a method."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from evolora import atomic, runfolder
from evolora.config import RunConfig, dump_config
from evolora.engine.checkpoints import (check_resume_config, checkpoint_path, drop_superseded_checkpoint,
                                        load_checkpoint, save_checkpoint, trim_step_log)
from evolora.engine.context import RunContext, build_context, count_parameters
from evolora.engine.loop import StepLog, partitions_optimizer, train_stage
from evolora.engine.scoring import (base_general_knowledge, base_general_perplexity, evaluate_dev,
                                    evaluate_located_final,
                                    evaluate_row, general_knowledge, general_perplexity, load_eval_cache,
                                    load_method_scores, save_eval_cache, save_method_scores, tasks_to_evaluate,
                                    write_predictions, zero_shot_row)
from evolora.engine.trackers import Trackers, check_trackers
from evolora.engine.zero import check_zero3_method, process_state_options, zero_stage
from evolora.engine.state import (clear_step_state, guarded_write, read_progress, read_step_state,
                                  restore_rng_state, rng_state, step_state_fits, write_progress)
from evolora.errors import EvoloraError
from evolora.methods import build_method, spelled_out, validate_method_options
from evolora.metrics import compute_metrics
from evolora.models import bf16_products, environment
from evolora.report import predictions_path
from evolora.runfolder import RunLock


def check_gpus_per_node(config: RunConfig) -> None:
    """Each process of a launch on GPUs takes its own GPU; more processes per node than GPUs would fail
    deep inside CUDA."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > 1 and config.model.device != "cpu" and torch.cuda.is_available() \
            and per_node > torch.cuda.device_count():
        raise EvoloraError(f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s): launch at most "
                           f"{torch.cuda.device_count()} (--nproc_per_node / --num_processes), or set model.device: cpu")


def check_launch() -> None:
    """A launch whose engine would partition the parameters behind evolora's back: accelerate's FSDP (it would
    wrap the model at every stage and split evaluation unevenly over processes whose forwards must run in step;
    evolora shards the model itself, train.fsdp)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise EvoloraError("an accelerate FSDP launch: launch with configs/accelerate/fsdp.yaml (a plain "
                           "multi-process launch) and set train.fsdp: true; evolora shards the model itself")


def run(config: RunConfig, run_dir: Optional[Path] = None, log: Callable[[str], None] = print,
        resume: bool = False) -> dict:
    """A whole continual run. With `resume`, continues the run folder from its last completed stage or
    its last step state."""
    from accelerate import PartialState

    check_gpus_per_node(config)
    check_launch()
    validate_method_options(config.method)  # before anything is read or written
    zero = zero_stage()  # a DeepSpeed launch's ZeRO stage (a bad one is refused here), or None
    if zero is not None and config.train.fsdp:
        raise EvoloraError("train.fsdp: a DeepSpeed launch partitions with ZeRO itself; set train.fsdp: false or "
                           "launch without DeepSpeed")
    if zero == 3:
        check_zero3_method(build_method(config.method))
    check_trackers(config)
    # On CPU, accelerate only recognises a torchrun/MPI launch as distributed when told it is on CPU (a DeepSpeed
    # launch's CPU processes join through DeepSpeed instead: engine/zero.py).
    dist = PartialState(**process_state_options(config.model.device == "cpu" or not torch.cuda.is_available(), zero))
    is_main = dist.is_main_process
    say = log if is_main else (lambda _: None)
    run_dir = Path(run_dir) if run_dir else config.run_dir()
    if resume and not (run_dir / runfolder.CONFIG).is_file():
        raise EvoloraError(f"{run_dir}: nothing to resume (no {runfolder.CONFIG})")
    created = not run_dir.exists()
    if not resume:  # every process (it only reads): all stop with the same line, none waits for a process gone
        runfolder.check_replaceable(run_dir, config.output.overwrite)
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvoloraError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    try:
        return _run_in_folder(config, run_dir, say, resume, is_main, dist)
    except BaseException:
        if is_main and created and not runfolder.is_marked(run_dir):  # failed before it began: leave no trace
            (run_dir / runfolder.LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _run_in_folder(config: RunConfig, run_dir: Path, say, resume: bool, is_main: bool, dist) -> dict:
    dist.wait_for_everyone()
    with RunLock(run_dir) if is_main else contextlib.nullcontext():
        if resume:
            check_resume_config(config, run_dir)
            progress = read_progress(run_dir) or {}
        else:
            if is_main:  # again under the lock; the folder is cleared only once the stream and model have loaded
                runfolder.check_replaceable(run_dir, config.output.overwrite)
            progress = {}
        dist.wait_for_everyone()
        with bf16_products(config.model):
            return _run_locked(config, run_dir, say, progress, is_main, fresh=not resume)


def _start_fresh(config: RunConfig, run_dir: Path) -> None:
    """A new run's folder: what an earlier run wrote there goes (the folder was checked to hold only that),
    then the marker and the config. Called once the stream, model and method have been built."""
    runfolder.clear(run_dir)
    runfolder.mark(run_dir, config.name)
    path = run_dir / runfolder.CONFIG
    text = dump_config(spelled_out(config))  # every method option, defaults filled in: what this run runs
    guarded_write(path, lambda: atomic.write_text(path, text))


def _run_locked(config: RunConfig, run_dir: Path, log, progress: dict, is_main: bool, fresh: bool = False) -> dict:
    started = time.perf_counter()
    timings: dict[str, Any] = dict(progress.get("timings", {}))
    zero_shot = progress.get("zero_shot")
    general_ppl: list[float] = list(progress.get("general_ppl", []))
    knowledge: list[dict] = list(progress.get("knowledge", []))
    locate_record: Optional[dict] = progress.get("locate")
    dev_record: Optional[dict] = progress.get("dev")

    def evaluate_zero_shot(ctx: RunContext) -> None:
        nonlocal zero_shot
        names = [t.name for t in ctx.tasks]
        log(f"{config.method.name} on {len(names)} tasks: {' -> '.join(names)} ({sum(len(t.train) for t in ctx.tasks)}"
            f" train / {sum(len(t.test) for t in ctx.tasks)} test examples)")
        if config.eval.zero_shot and zero_shot is None:
            t0 = time.perf_counter()
            zero_shot = zero_shot_row(ctx)
            timings["zero_shot_eval_s"] = time.perf_counter() - t0
        if zero_shot is not None:
            log("zero-shot: " + "  ".join(f"{n} {a:.1f}" for n, a in zip(names, zero_shot)))
        if config.eval.general_text and not general_ppl:
            general_ppl.append(base_general_perplexity(ctx))
        if general_ppl:
            log(f"general-text perplexity of the base model: {general_ppl[0]:.2f}")
        if config.eval.general_tasks and not knowledge:
            knowledge.append(base_general_knowledge(ctx))
        if knowledge:
            log(f"general knowledge of the base model: {knowledge[0]['mean']:.1f} % ({config.eval.choice_norm} norm)")

    ctx, method = build_context(config, run_dir, log, before_setup=evaluate_zero_shot)
    if fresh:
        if is_main:
            _start_fresh(config, run_dir)
        ctx.accelerator.wait_for_everyone()
    names = [t.name for t in ctx.tasks]
    R: list[list[Optional[float]]] = list(progress.get("R", []))
    stage_records: list[dict] = list(progress.get("stages", []))
    checksums: dict[str, str] = dict(progress.get("checkpoints", {}))
    global_step = progress.get("global_step", 0)
    completed = len(R)
    previous_s = timings.get("total_s", 0.0)

    # A stage whose training finished and whose checkpoint was saved, but whose evaluation did not: resume
    # loads that checkpoint and redoes only the evaluation.
    trained: Optional[dict] = progress.get("trained")
    if trained is not None and (trained["stage"] != completed
                                or not checkpoint_path(run_dir, completed).is_file()):
        trained = None
    loaded = completed + (trained is not None)
    if loaded:  # rebuild the structure of the finished stages, then load the last one's tensors
        for stage in range(loaded):
            method.grow(stage, ctx)
        path = checkpoint_path(run_dir, loaded - 1)
        load_checkpoint(ctx, method, path, checksums.get(path.name))
        reused = load_eval_cache(ctx, run_dir)
        method_kept = load_method_scores(ctx, method, run_dir)
        if progress.get("rng"):  # as they were when progress.json was written: the same draws from here on
            restore_rng_state(progress["rng"], run_dir / runfolder.PROGRESS)
        log(f"resumed after stage {completed}/{len(ctx.stages)}"
            + (f"; stage {loaded} was trained and is evaluated now" if trained else "")
            + (f"; {reused} task scores kept for the eval cache" if reused else "")
            + ("; the method's kept scores restored" if method_kept else ""))
    step_state = read_step_state(run_dir)
    launch = (ctx.accelerator.num_processes, partitions_optimizer(ctx))
    if step_state and trained is None and step_state["stage"] == completed and not step_state_fits(step_state, *launch):
        log(f"stage {completed + 1} restarts from its beginning: its mid-stage state (step {step_state['step']}) was "
            f"saved by a launch of {step_state.get('processes', 1)} process(es) without FSDP or ZeRO, and this "
            f"launch has {launch[0]}{' and partitions the optimizer' if launch[1] else ''}")
        step_state = None
    trackers = Trackers(config, run_dir if is_main else None)
    try:
        step_log = StepLog(run_dir if is_main else None, trackers)
        if step_log.path and step_log.path.is_file():
            trim_step_log(step_log.path, loaded, step_state)

        def save_progress(complete: bool) -> dict:
            timings["total_s"] = previous_s + time.perf_counter() - started
            record = _metrics_record(config, method, ctx, names, R, zero_shot, stage_records, timings, complete,
                                     general_ppl, knowledge)
            record["locate"] = locate_record
            record["dev"] = dev_record
            if is_main:
                write_progress(run_dir, {"zero_shot": zero_shot, "general_ppl": general_ppl, "knowledge": knowledge,
                                         "locate": locate_record, "dev": dev_record,
                                         "R": R, "stages": stage_records, "trained": trained,
                                         "checkpoints": checksums, "global_step": global_step, "timings": timings,
                                         "rng": rng_state()})
                guarded_write(run_dir / runfolder.METRICS, lambda: atomic.write_json(run_dir / runfolder.METRICS, record))
            return record

        continual = all(len(s) == 1 for s in ctx.stages)
        for stage in range(completed, len(ctx.stages)):
            task_indices = ctx.stages[stage]
            if trained is not None and trained["stage"] == stage:
                train_stats = trained["train"]
            else:
                method.grow(stage, ctx)
                method.before_stage(stage, ctx)
                examples = [enc for i in task_indices for enc in ctx.encode_train(i)]
                examples = method.training_examples(stage, examples, ctx)
                resume_from = step_state if step_state and step_state["stage"] == stage else None
                if resume_from:
                    log(f"resuming stage {stage + 1} after step {resume_from['step']}")
                train_stats = train_stage(ctx, method, stage, examples, step_log, global_step, resume_from)
                global_step += train_stats["steps"]
                method.after_stage(stage, ctx)
                figures = method.stage_metrics(stage)
                if figures:
                    train_stats["method"] = figures
                digest = save_checkpoint(ctx, method, stage)  # every process: a sharded model is gathered
                save_method_scores(ctx, method, run_dir)
                if is_main:
                    checksums[checkpoint_path(run_dir, stage).name] = digest
                trained = {"stage": stage, "train": train_stats}
                save_progress(complete=False)
                if is_main:
                    clear_step_state(run_dir)
                    drop_superseded_checkpoint(ctx, stage)
            step_state = None

            t0, hits = time.perf_counter(), ctx.eval_cache_hits
            policy = config.eval.future_tasks if continual else "all"
            row, info = evaluate_row(ctx, method, tasks_to_evaluate(policy, max(task_indices), len(ctx.tasks)),
                                     config.eval.task_id)
            save_eval_cache(ctx, run_dir)
            if config.eval.save_predictions:
                write_predictions(ctx, predictions_path(run_dir, f"stage-{stage + 1:02d}"), info["predictions"],
                                  f"stage-{stage + 1:02d}")
            ppl = general_perplexity(ctx, method, max(task_indices))
            last = stage == len(ctx.stages) - 1
            known = general_knowledge(ctx, method, max(task_indices)) \
                if config.eval.knowledge_every_stage or last else None
            if known is not None:
                knowledge.append(known)
            eval_s = time.perf_counter() - t0
            if ppl is not None:
                general_ppl.append(ppl)
            R.append(row)
            trackers.log_stage(stage, names, row, ppl, known)
            stage_records.append({"tasks": [names[i] for i in task_indices], "train": train_stats, "eval_s": eval_s,
                                  "eval_reused": ctx.eval_cache_hits - hits,
                                  **({"locator": info["locator"]} if info["locator"] else {})})
            trained = None
            save_progress(complete=False)
            log(f"stage {stage + 1}/{len(ctx.stages)} [{', '.join(names[i] for i in task_indices)}]: "
                f"{train_stats['steps']} steps, loss {train_stats['final_loss']:.3f}, "
                f"{train_stats['tokens_per_s']:.0f} tok/s, train {train_stats['seconds']:.0f}s, eval {eval_s:.0f}s | "
                + "  ".join(f"{names[j]} {a:.1f}" for j, a in enumerate(row) if a is not None)
                + (f" | general ppl {ppl:.2f} ({100 * (ppl / general_ppl[0] - 1):+.1f} %)" if ppl is not None else "")
                + (f" | knowledge {known['mean']:.1f} ({known['mean'] - knowledge[0]['mean']:+.1f})" if known else ""))
        if (locate_record is None and method.has_locator and config.eval.locate_final
                and config.eval.task_id == "oracle"):
            t0 = time.perf_counter()
            locate_record = evaluate_located_final(
                ctx, method, predictions_path(run_dir, "final-located") if config.eval.save_predictions else None)
            timings["locate_eval_s"] = time.perf_counter() - t0
            log(f"final model with located task ids: AP {locate_record['AP']:.1f}, locator accuracy "
                + ", ".join(f"{k} {v:.1f} %" for k, v in locate_record["locator_by_kind"].items()))
        if dev_record is None and any(t.dev for t in ctx.tasks):
            t0 = time.perf_counter()
            dev_record = evaluate_dev(ctx, method)
            timings["dev_eval_s"] = time.perf_counter() - t0
            log(f"final model on the dev split (for choices; never the test split): AP {dev_record['AP']:.1f}")
        record = save_progress(complete=True)
        trackers.log_final(record["metrics"], len(ctx.stages))
    finally:
        trackers.finish()
    if is_main:
        from evolora.report import write_report

        write_report(run_dir)
    return record


def _metrics_record(config, method, ctx, names, R, zero_shot, stage_records, timings, complete: bool,
                    general_ppl: list[float], knowledge: Optional[list[dict]] = None) -> dict:
    params = count_parameters(ctx.model, method)
    n_tasks = len(names)
    continual = all(len(s) == 1 for s in ctx.stages)
    summary = compute_metrics(R, zero_shot, continual) if complete else {}
    drift = [100.0 * (p / general_ppl[0] - 1.0) for p in general_ppl[1:]] if general_ppl else []
    if complete and drift:
        summary["drift_pct"] = drift[-1]
    if complete and knowledge and len(knowledge) > 1:
        summary["knowledge_pts"] = knowledge[-1]["mean"] - knowledge[0]["mean"]
    forgetting = summary.get("forgetting_per_task") or [None] * n_tasks
    return {
        "name": config.name,
        "method": method.name,
        "model": config.model.name,
        "stream": {"name": config.data.stream, "order": config.data.order, "tasks": names},
        "eval_mode": config.eval.mode,
        "complete": complete,
        "R": R,
        "zero_shot": zero_shot,
        "metrics": summary,
        "per_task": {
            name: {"final": R[-1][j] if R else None, "zero_shot": zero_shot[j] if zero_shot else None,
                   "forgetting": forgetting[j] if j < n_tasks - 1 and j < len(forgetting) else None}
            for j, name in enumerate(names)
        },
        "general": {"text": config.eval.general_text, "perplexity": general_ppl,
                    "drift_pct_per_stage": drift} if general_ppl else None,
        "knowledge": {"tasks": list(config.eval.general_tasks), "norm": config.eval.choice_norm,
                      "per_stage": [{k: v for k, v in known.items() if k != "correct"} for known in knowledge],
                      **({"final_correct": knowledge[-1]["correct"]}
                         if complete and len(knowledge) > 1 and knowledge[-1].get("correct") else {})}
        if knowledge else None,
        "parameters": {**params, "added_per_task": params["added"] / n_tasks if n_tasks else 0},
        "stages": stage_records,
        "timings": {**timings, "train_s": sum(s["train"]["seconds"] for s in stage_records),
                    "eval_s": sum(s["eval_s"] for s in stage_records) + timings.get("zero_shot_eval_s", 0.0)},
        "method_metrics": method.extra_metrics(),
        "environment": environment(),
    }
