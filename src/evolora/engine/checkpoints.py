"""Stage checkpoints (what the method learned, checksummed in progress.json), the resume check, and trimming
the step log to the work a resume keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evolora import atomic, runfolder
from evolora.config import RunConfig, flatten
from evolora.engine.context import RunContext
from evolora.engine.sharding import checkpoint_tensors
from evolora.engine.state import load_tensors, save_tensors
from evolora.errors import EvoloraError
from evolora.methods import Method, spelled_out


def checkpoint_path(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / runfolder.CHECKPOINTS / f"stage-{stage + 1:02d}.safetensors"


def save_checkpoint(ctx: RunContext, method: Method, stage: int) -> Optional[str]:
    """Writes the stage's checkpoint; returns its sha256. Every process calls it (a sharded model's tensors are
    gathered whole from all of them); the main process writes, the others return None."""
    state = checkpoint_tensors(ctx, method)
    if not ctx.accelerator.is_main_process:
        return None
    path = checkpoint_path(ctx.run_dir, stage)
    names = [ctx.tasks[i].name for i in ctx.stages[stage]]
    return save_tensors(path, state, {"stage": str(stage), "tasks": ",".join(names), "method": method.name})


def drop_superseded_checkpoint(ctx: RunContext, stage: int) -> None:
    """With keep_checkpoints=last, removes the previous stage's checkpoint — called only once progress.json
    names the new one, so a crash in between always leaves a checkpoint that progress.json can resume from."""
    if ctx.config.output.keep_checkpoints == "last" and stage > 0:
        checkpoint_path(ctx.run_dir, stage - 1).unlink(missing_ok=True)


def load_checkpoint(ctx: RunContext, method: Method, path: Path, sha256: Optional[str] = None,
                    skip_module: Optional[str] = None) -> None:
    """Loads a stage's tensors into the model; those under `skip_module` (a top-level module name) stay as
    they are."""
    state = load_tensors(path, sha256)
    if skip_module:
        state = {k: v for k, v in state.items() if not k.startswith(skip_module + ".")}
    try:
        method.load_checkpoint_state(ctx.model, state)
    except (KeyError, RuntimeError) as exc:  # other tensors, or other shapes (a config edited after the run)
        raise EvoloraError(f"{path}: does not match the model of this run's config ({exc.args[0]})") from None


def check_resume_config(config: RunConfig, run_dir: Path) -> None:
    from evolora.config import load_config

    saved = load_config(run_dir / runfolder.CONFIG)
    source = str(run_dir / runfolder.CONFIG)
    # Both sides with every method option spelled out: a folder written with its options spelled out keeps the
    # defaults of the evolora that started it, so a change of defaults since then is refused by name.
    ignore = {"output.dir", "output.overwrite"}
    mine, theirs = (flatten(spelled_out(c, source).model_dump(mode="json")) for c in (config, saved))
    for key in sorted(set(mine) | set(theirs)):
        if key not in ignore and mine.get(key) != theirs.get(key):
            raise EvoloraError(f"--resume: {key} is {mine.get(key)!r} here but {theirs.get(key)!r} in "
                               f"{run_dir / 'config.yaml'}; a run resumes with the config it started with")


def trim_step_log(path: Path, completed: int, step_state: Optional[dict]) -> None:
    """Drops log lines of work that a resume will redo."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done = rec["stage"] < completed or (step_state is not None and rec["stage"] == step_state["stage"]
                                            and rec["step"] <= step_state["step"])
        if done:
            keep.append(line)
    atomic.write_text(path, "".join(x + "\n" for x in keep))
