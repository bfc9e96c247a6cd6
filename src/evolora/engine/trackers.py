"""Experiment trackers through accelerate's tracker classes: TensorBoard, Weights & Biases, MLflow.

What each receives: the resolved config as hyperparameters; every logged training step (`train/loss`,
`train/lr`, the method's loss terms, ...) at the global step; after every stage, each evaluated task's accuracy
(`eval/acc/<task>`, the row of R), the mean over seen tasks, held-out perplexity and general knowledge, at step =
the stage number; at the end, AP/Avg/BWT/FWT/forgetting/drift/knowledge (`final/...`).

Where they write: TensorBoard into the run folder's `tensorboard/`; W&B as `wandb.init` is told by its own
environment (`WANDB_MODE=offline` writes `wandb/` in the run folder, no network); MLflow to `MLFLOW_TRACKING_URI`
when set, else a file store in the run folder's `mlruns/`. Only the main process logs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from evolora import runfolder
from evolora.config import RunConfig, flatten
from evolora.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny sqlalchemy alembic"}


def _hyperparameters(config: RunConfig) -> dict:
    """The config as flat hyperparameters; lists and other values the trackers cannot take become text."""
    return {key: value if isinstance(value, (int, float, str, bool)) else
            (", ".join(map(str, value)) if isinstance(value, list) else str(value))
            for key, value in flatten(config.model_dump(mode="json")).items()}


def check_trackers(config: RunConfig) -> None:
    """Before anything is written: every tracker asked for can be imported."""
    import importlib.util

    for name in config.output.trackers:
        module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
        try:
            found = importlib.util.find_spec(module) is not None and (name != "tensorboard"
                                                                     or importlib.util.find_spec("tensorboard"))
        except (ImportError, ValueError):  # a module set to None (uninstalled in a test), a broken package
            found = False
        if not found:
            raise ConfigError(f"output.trackers: {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")


class Trackers:
    def __init__(self, config: RunConfig, run_dir: Optional[Path]):
        names = list(dict.fromkeys((["tensorboard"] if config.output.tensorboard else []) + list(config.output.trackers)))
        self.trackers = []
        if run_dir is None:
            return
        for name in names:
            try:
                self.trackers.append(self._make(name, config, Path(run_dir)))
            except ImportError:
                if name == "tensorboard" and "tensorboard" not in config.output.trackers:
                    continue  # the default: skipped quietly when TensorBoard is not installed
                raise ConfigError(f"output.trackers: {name} needs the {PACKAGES[name]} package: "
                                  f"pip install {PACKAGES[name]}") from None
        for tracker in self.trackers:
            tracker.store_init_configuration(_hyperparameters(config))

    @staticmethod
    def _make(name: str, config: RunConfig, run_dir: Path):
        from accelerate import tracking

        if name == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (ImportError when tensorboard is missing)

            tracker = tracking.TensorBoardTracker("", run_dir / runfolder.TENSORBOARD)
        elif name == "wandb":
            import wandb  # noqa: F401

            tracker = tracking.WandBTracker(config.name, dir=str(run_dir), name=config.name)
        else:
            import mlflow

            artifacts = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's own default store, kept in the run folder
                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / runfolder.MLFLOW_DB).resolve()}")
                artifacts = (run_dir / runfolder.MLRUNS).resolve().as_uri()
            tracker = tracking.MLflowTracker(experiment_name=config.name, logging_dir=artifacts, run_name=config.name)
        tracker.start()
        return tracker

    def log(self, values: dict, step: int) -> None:
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_stage(self, stage: int, names: list[str], row: list, ppl: Optional[float],
                  knowledge: Optional[dict]) -> None:
        values = {f"eval/acc/{name}": value for name, value in zip(names, row) if value is not None}
        seen = [v for v in row[:stage + 1] if v is not None]
        if seen:
            values["eval/mean_seen"] = sum(seen) / len(seen)
        if ppl is not None:
            values["eval/general_perplexity"] = ppl
        if knowledge is not None:
            values["eval/knowledge"] = knowledge["mean"]
        self.log(values, stage + 1)

    def log_final(self, summary: dict, stages: int) -> None:
        keys = {"AP": "AP", "Avg": "Avg", "BWT": "BWT", "FWT": "FWT", "forgetting": "forgetting",
                "drift_pct": "drift", "knowledge_pts": "knowledge"}
        self.log({f"final/{label}": summary[key] for key, label in keys.items() if summary.get(key) is not None},
                 stages)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
