"""evolora's Python API, in one import (docs/api.md):

    from evolora.api import build_config, run, load_run, evaluate_run, predict, export_run, Example

- `build_config(dict, overrides)` / `load_config(path, overrides)`: a validated RunConfig (one-line errors).
- `run(config, run_dir=None, log=print, resume=False)`: a whole continual run; returns the metrics record
  (what metrics.json holds: R, AP/Avg/BWT/FWT, drift, knowledge, timings).
- `load_run(run_dir)`: the finished run's (context, method): `context.model` is the trained model,
  `context.tokenizer` its tokenizer, `context.tasks` the stream; `with method.route(t):` answers as task t.
- `evaluate_run(run_dir, overrides)`: re-evaluates the final model (writes eval.json).
- `predict(run_dir, examples, task=None)`: answers new inputs (an expert method locates the task itself).
- `export_run(run_dir, out, stage=None, task=None, merge=False)`: a PEFT adapter folder or a plain model folder."""

from evolora.config import build_config, load_config
from evolora.data.tasks import Example
from evolora.engine import run
from evolora.export import export_run
from evolora.reload import evaluate_run, load_run, predict

__all__ = ["Example", "build_config", "evaluate_run", "export_run", "load_config", "load_run", "predict", "run"]
