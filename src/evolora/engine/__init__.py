"""The engine: runs a stream through a method's declared hooks and never names a method.

    context.py      stream, model, method and accelerator of a run (RunContext, build_context)
    loop.py         one stage's training loop, top to bottom
    scoring.py      a row of R (oracle or located), the zero-shot row, predictions, general ability
    checkpoints.py  stage checkpoints, the resume check
    state.py        progress.json, step state, checksummed tensors (what survives a crash)
    sharding.py     FSDP (train.fsdp): the model sharded over the processes, gathered for checkpoints
    zero.py         DeepSpeed ZeRO launches: the processes, the engine's batch sizes from the run's config
    runner.py       the whole run: folder, lock, stages, metrics.json, report"""

from evolora.engine.checkpoints import check_resume_config, checkpoint_path, load_checkpoint
from evolora.engine.context import RunContext, build_context, count_parameters
from evolora.engine.loop import Interrupted, StepLog, train_stage
from evolora.engine.runner import check_gpus_per_node, run
from evolora.engine.scoring import evaluate_located_final, evaluate_row, general_knowledge, write_predictions

__all__ = ["Interrupted", "RunContext", "StepLog", "build_context", "check_gpus_per_node",
           "check_resume_config", "checkpoint_path", "count_parameters", "evaluate_located_final", "evaluate_row",
           "general_knowledge", "load_checkpoint", "run", "train_stage", "write_predictions"]
