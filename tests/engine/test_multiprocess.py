"""Two CPU processes (torchrun, gloo): DDP training, sharded evaluation gathered across ranks, rank 0 alone
writes. Checked against one process: the zero-shot row and a single-process re-evaluation of the final
checkpoint must equal what the two processes computed together."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.process


def torchrun(tmp_path, raw: dict, name: str = "c", **launch_env):
    """`evolora run` of the config `raw` over two CPU processes (gloo): (the finished process, its environment).
    A fresh cache: base-model figures are computed by the two processes, not read from disk. CPU processes also
    on a GPU machine: accelerate's barrier names a CUDA device per rank whenever CUDA is visible. `launch_env`:
    what `accelerate launch` would set (a DeepSpeed launch)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, TQDM_DISABLE="1", EVOLORA_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="",
               **launch_env)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "evolora", "run", str(config)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    return result, env


def test_two_process_run_matches_single_process_evaluation(tmp_path, tiny_config):
    probe = tmp_path / "probe"  # a general-knowledge probe of 5 questions: shards of 3 and 2
    probe.mkdir()
    (probe / "test.json").write_text(json.dumps([
        {"sentence": f"The word {w} means:", "choices": ["a thing", "an act", "a place"], "label": choice}
        for w, choice in (("stone", "a thing"), ("run", "an act"), ("city", "a place"), ("calm", "a thing"),
                          ("tree", "a thing"))]))
    raw = tiny_config(tmp_path, model={"device": "cpu"}, data={"train_per_label": 6, "test_per_label": 5},
                      train={"batch_size": 2}, eval={"general_tasks": [str(probe)]})
    result, env = torchrun(tmp_path, raw)  # the zero-shot row is computed by the two processes
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Accuracy matrix R") == 1  # only rank 0 reports
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complete"]
    # 2 tasks x 4 or 3 labels x 6 examples, batches of 2, split over 2 ranks
    assert [s["train"]["steps"] for s in metrics["stages"]] == [6, 4]
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len({(r["stage"], r["step"]) for r in steps}) == len(steps)
    final = load_file(run_dir / "checkpoints" / "stage-02.safetensors")
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # it trained

    single = subprocess.run([sys.executable, "-m", "evolora", "eval", str(run_dir), "--knowledge"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert [evaluated["accuracy"][t] for t in metrics["stream"]["tasks"]] == metrics["R"][-1]
    # the probe's per-question correctness, gathered from the two ranks, is what one process finds, in order
    assert evaluated["knowledge"]["correct"] == metrics["knowledge"]["final_correct"]
    assert evaluated["knowledge"]["mean"] == metrics["knowledge"]["per_stage"][-1]["mean"]
    # the two ranks' shards of the predictions are put back in test-set order
    def predictions(label):
        lines = (run_dir / "predictions" / f"{label}.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "eval"} for x in lines]
    assert predictions("stage-02") == predictions("eval-oracle")

    one_process = tiny_config(tmp_path / "one", model={"device": "cpu"}, data={"train_per_label": 6, "test_per_label": 5},
                              eval={"zero_shot": True})
    from evolora.config import build_config
    from evolora.engine import build_context, evaluate_row

    ctx, _ = build_context(build_config(one_process), None)
    from evolora.methods import Method

    with ctx.model.disable_adapter():
        row, _ = evaluate_row(ctx, Method(), [0, 1])
    assert row == metrics["zero_shot"]


def _two_processes(tmp_path, raw, name, **launch_env):
    result, env = torchrun(tmp_path, {**raw, "output": {**raw["output"], "dir": str(tmp_path / name)}}, name,
                           **launch_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name, env


def test_fsdp_over_two_processes_trains_as_ddp_does(tmp_path, tiny_config):
    """train.fsdp shards a full fine-tuning run over two CPU processes (torch FSDP2, gloo): the same batches
    as DDP give the same weights (the checkpoint gathers the shards whole) and the same R, and a one-process
    `evolora eval` of its checkpoint reproduces that R."""
    raw = tiny_config(tmp_path, "seq_ft", model={"device": "cpu"}, data={"train_per_label": 6, "test_per_label": 5},
                      train={"batch_size": 2})
    ddp, _ = _two_processes(tmp_path, raw, "ddp")
    fsdp, env = _two_processes(tmp_path, {**raw, "train": {**raw["train"], "fsdp": True}}, "fsdp")
    _same_as_ddp(fsdp, ddp, env)
    start = load_file(fsdp / "checkpoints" / "stage-01.safetensors")
    a = load_file(fsdp / "checkpoints" / "stage-02.safetensors")
    assert "model.norm.weight" in a  # the trained tensors, base weights included, whole
    assert not torch.equal(start["model.norm.weight"], a["model.norm.weight"])  # every unit trains in stage 2


def _same_as_ddp(run, ddp, env):
    """The run's checkpoints, R and parameter counts are those of the DDP run on the same batches, stage 2
    trained, and a one-process `evolora eval` of its checkpoint reproduces its R."""
    a = load_file(run / "checkpoints" / "stage-02.safetensors")
    b = load_file(ddp / "checkpoints" / "stage-02.safetensors")
    # equal up to rounding (e.g. a clipping norm summed over shards in another order), which AdamW can lift
    # to ~1e-5 where a gradient is near zero
    assert set(a) == set(b) and all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    start = load_file(run / "checkpoints" / "stage-01.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in start)  # stage 2 trained
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (run, ddp))
    assert metrics["R"] == reference["R"] and metrics["parameters"] == reference["parameters"]
    single = subprocess.run([sys.executable, "-m", "evolora", "eval", str(run)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    evaluated = json.loads((run / "eval.json").read_text())
    assert [evaluated["accuracy"][t] for t in metrics["stream"]["tasks"]] == metrics["R"][-1]


ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_MIXED_PRECISION": "no",
         "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"}
"""What `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` sets (its precision: the tiny
model is fp32)."""


@pytest.mark.parametrize("stage,method", [(2, "seq_lora"), (2, "moe_cl"), (3, "seq_lora"), (3, "seq_ft")])
def test_deepspeed_zero_over_two_cpu_processes_trains_as_ddp_does(tmp_path, tiny_config, stage, method):
    """A DeepSpeed launch runs DeepSpeed's engine on two CPU processes (its CPU accelerator, gloo), over two
    stages with accumulation over 2 batches: the same weights, R and parameter counts as DDP on the same batches,
    and a one-process `evolora eval` of its checkpoint reproduces R. ZeRO-2: a new engine each stage (the last
    one's gradient hooks removed). ZeRO-3: one engine for the run gathers the partitioned parameters for every
    forward (evaluation runs the same forwards on both processes), each stage restarts the optimizer, and
    checkpoints gather the full tensors."""
    pytest.importorskip("deepspeed")
    raw = tiny_config(tmp_path, method, model={"device": "cpu"}, data={"train_per_label": 6, "test_per_label": 5},
                      train={"batch_size": 2, "grad_accum": 2})
    ddp, _ = _two_processes(tmp_path, raw, "ddp")
    zero, env = _two_processes(tmp_path, raw, "zero", **{**ZERO2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)})
    _same_as_ddp(zero, ddp, env)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_killed_deepspeed_run_resumes_from_its_last_stage_checkpoint(tmp_path, tiny_config, stage):
    """Both processes of a ZeRO run killed during stage 2 (no mid-stage state: the optimizer is partitioned),
    then `--resume` under the same launch: stage 2 is trained again from the stage-1 checkpoint, and the result
    is the uninterrupted run's."""
    import signal
    import time

    from evolora.engine.state import read_progress

    pytest.importorskip("deepspeed")
    raw = tiny_config(tmp_path, "seq_lora", model={"device": "cpu"}, data={"train_per_label": 60, "test_per_label": 3},
                      train={"batch_size": 1, "epochs": 3})
    launch = {**ZERO2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}
    reference, env = _two_processes(tmp_path, raw, "ref", **launch)
    config = tmp_path / "k.yaml"
    run_dir = tmp_path / "run"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "evolora", "run", str(config)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while not (run_dir.is_dir() and len((read_progress(run_dir) or {}).get("R", [])) == 1):
        assert proc.poll() is None and time.time() < deadline, "the run ended before stage 2 could be interrupted"
        time.sleep(0.05)
    import psutil

    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)  # the workers too (torchrun starts them in sessions of their own)
    proc.wait()
    resumed = subprocess.run([*command, "--resume", str(run_dir)], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after stage 1/2" in resumed.stdout, [x for x in resumed.stdout.splitlines() if "stage" in x]
    a = load_file(run_dir / "checkpoints" / "stage-02.safetensors")
    b = load_file(reference / "checkpoints" / "stage-02.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((run_dir / "metrics.json").read_text())["R"] == json.loads((reference / "metrics.json").read_text())["R"]


def test_fsdp_refuses_a_method_that_grows_in_one_line(tmp_path, tiny_config):
    from evolora.config import build_config
    from evolora.engine import build_context
    from evolora.engine.sharding import shard_model
    from evolora.errors import EvoloraError

    ctx, method = build_context(build_config(tiny_config(tmp_path, "per_task_lora", train={"fsdp": True})), None)
    with pytest.raises(EvoloraError, match=r"^train.fsdp: method per_task_lora cannot be sharded") as err:
        shard_model(ctx, method)
    assert "\n" not in str(err.value) and not ctx.sharded


def test_an_accelerate_fsdp_launch_is_refused_in_one_line(tmp_path, tiny_config, monkeypatch):
    from evolora.config import build_config
    from evolora.engine import run
    from evolora.errors import EvoloraError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(EvoloraError, match="set train.fsdp: true") as err:
        run(build_config(tiny_config(tmp_path)), tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_wrong_deepspeed_launches_are_refused_in_one_line(tmp_path, tiny_config, monkeypatch):
    """ZeRO-3 with a method that adds parameters per task, FSDP inside a DeepSpeed launch, a bad stage."""
    from evolora.config import build_config
    from evolora.engine import run
    from evolora.errors import EvoloraError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(EvoloraError, match="^DeepSpeed ZeRO-3: method moe_cl cannot have its parameters") as err:
        run(build_config(tiny_config(tmp_path, "moe_cl")), tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    with pytest.raises(EvoloraError, match="^train.fsdp: a DeepSpeed launch partitions with ZeRO itself"):
        run(build_config(tiny_config(tmp_path, train={"fsdp": True})), tmp_path / "run")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "three")
    with pytest.raises(EvoloraError, match="^ACCELERATE_DEEPSPEED_ZERO_STAGE: expected 0-3, got 'three'"):
        run(build_config(tiny_config(tmp_path)), tmp_path / "run")


def test_a_refused_run_folder_stops_every_process_with_the_same_line(tmp_path, tiny_config):
    """Every process checks the run folder (reading only), so none is left waiting for a process that stopped."""
    raw = tiny_config(tmp_path, model={"device": "cpu"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result, _ = torchrun(tmp_path, raw)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("is not a run folder evolora made") == 2  # one line from each process
    assert "Connection closed" not in output and "gloo" not in output
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_step_state_of_another_launch_restarts_its_stage(tmp_path, tiny_config):
    """A one-process run killed in stage 2 leaves a mid-stage step state; resumed over two processes, whose
    shares of the batches differ, that state is not used: stage 2 restarts from the stage-1 checkpoint, with a
    line saying so, and ends exactly as the same folder without the step state does."""
    import shutil
    import signal
    import time

    raw = tiny_config(tmp_path, model={"device": "cpu"}, data={"train_per_label": 24, "test_per_label": 4},
                      train={"batch_size": 1, "checkpoint_every": 5})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir, state = tmp_path / "run", tmp_path / "run" / "state" / "step.json"
    env = dict(os.environ, TQDM_DISABLE="1", EVOLORA_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "evolora", "run", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while not (state.is_file() and json.loads(state.read_text() or "{}").get("stage") == 1):
        assert proc.poll() is None and time.time() < deadline, "the run ended before stage 2 could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["processes"] == 1
    shutil.copytree(run_dir, tmp_path / "bare")
    for leftover in (tmp_path / "bare" / "state").glob("step.*"):
        leftover.unlink()

    def resume(folder):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "evolora", "run", str(config), "--resume", str(folder)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out = resume(run_dir)
    assert "stage 2 restarts from its beginning" in out and "saved by a launch of 1 process" in out, out[-2000:]
    assert "resuming stage 2 after step" not in out
    resume(tmp_path / "bare")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complete"] and "resumed_at_step" not in metrics["stages"][1]["train"]
    a = load_file(run_dir / "checkpoints" / "stage-02.safetensors")
    b = load_file(tmp_path / "bare" / "checkpoints" / "stage-02.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["R"] == json.loads((tmp_path / "bare" / "metrics.json").read_text())["R"]
    assert not state.exists()
