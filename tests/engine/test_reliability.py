"""Faults: SIGKILL mid-task then --resume, Ctrl-C, a second run into a locked folder, corrupt
checkpoints, NaN loss, a full disk while saving; and determinism."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import CrashedInEvaluation, run_crashing_in_evaluation
from evolora.config import build_config
from evolora.engine import checkpoint_path, run
from evolora.errors import EvoloraError
from evolora.methods import register
from evolora.methods.registry import METHODS
from evolora.methods.seq_lora import SeqLoRA
from evolora.runfolder import RunLock
from evolora.engine.state import read_progress


def long_config(tiny_config, tmp_path, **train):
    raw = tiny_config(tmp_path, data={"train_per_label": 24, "test_per_label": 4},
                      train={"batch_size": 1, "checkpoint_every": 5, **train})
    return raw


def start(args, tmp_path):
    env = dict(os.environ, TQDM_DISABLE="1")
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # Ctrl-C handler: give the child the default disposition so the test does not depend on how it was launched.
    return subprocess.Popen([sys.executable, "-m", "evolora", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step_state(run_dir, proc, stage, timeout=300):
    deadline = time.time() + timeout
    state = run_dir / "state" / "step.json"
    while time.time() < deadline:
        if state.is_file():
            try:
                record = json.loads(state.read_text())
            except json.JSONDecodeError:
                record = None
            if record and record["stage"] == stage and record["step"] >= 9:
                return record
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError("no step state appeared")


def comparable(metrics):
    return {"R": metrics["R"], "zero_shot": metrics["zero_shot"], "metrics": metrics["metrics"]}


@pytest.mark.process
def test_sigkill_mid_task_then_resume_gives_the_same_result(tmp_path, tiny_config):
    raw = long_config(tiny_config, tmp_path)
    reference = run(build_config({**raw, "output": {**raw["output"], "dir": str(tmp_path / "ref")}}))

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = start(["run", config], tmp_path)
    killed_at = wait_for_step_state(run_dir, proc, stage=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / ".lock").is_file()  # left behind by the killed process: taken over on resume
    assert len(read_progress(run_dir)["R"]) == 1

    result = subprocess.run([sys.executable, "-m", "evolora", "run", str(config), "--resume", str(run_dir)],
                            capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    assert result.returncode == 0, result.stderr
    assert "resumed after stage 1/2" in result.stdout and "resuming stage 2 after step" in result.stdout
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["complete"] and resumed["stages"][1]["train"]["resumed_at_step"] >= killed_at["step"] + 1
    assert comparable(resumed) == comparable(reference)
    # stronger than equal accuracies: the final weights are bit-for-bit those of the uninterrupted run
    from safetensors.torch import load_file

    ours, theirs = load_file(checkpoint_path(run_dir, 1)), load_file(checkpoint_path(tmp_path / "ref", 1))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (run_dir / "state" / "step.json").exists()
    with RunLock(run_dir):  # released: the next run takes it at once
        pass
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"]) for r in steps]
    assert len(keys) == len(set(keys))  # redone steps are not logged twice


@pytest.mark.process
def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path, tiny_config):
    raw = long_config(tiny_config, tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = start(["run", config], tmp_path)
    wait_for_step_state(run_dir, proc, stage=0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at stage 1" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert (run_dir / "state" / "step.json").is_file()
    with RunLock(run_dir):  # released by the interrupted process
        pass
    result = subprocess.run([sys.executable, "-m", "evolora", "run", str(config), "--resume", str(run_dir)],
                            capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["complete"]


def test_locked_folder_and_resume_with_other_config(tmp_path, tiny_config):
    raw = tiny_config(tmp_path)
    cfg = build_config(raw)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        with pytest.raises(EvoloraError, match="in use by process"):
            run(cfg)
    run(cfg)
    with pytest.raises(EvoloraError, match=r"--resume: train.lr is 0.5 here but 0.001"):
        run(build_config(raw, ["train.lr=0.5"]), resume=True)
    with pytest.raises(EvoloraError, match="nothing to resume"):
        run(cfg, tmp_path / "elsewhere", resume=True)


def test_the_run_folder_keeps_every_option_so_later_defaults_cannot_change_a_run(tmp_path, tiny_config):
    """config.yaml spells out the method's options with their defaults; a resume whose options resolve otherwise
    (evolora's defaults changed since the run started) is refused by name, and one started by an evolora that
    kept only the options given still resumes."""
    from evolora.engine import check_resume_config
    from evolora.methods.olora import OLoRAOptions

    raw = tiny_config(tmp_path, "olora")
    run(build_config(raw))
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["method"]["options"]["alpha"] == OLoRAOptions().alpha and saved["method"]["options"]["lambda_orth"] == 0.5
    check_resume_config(build_config(raw), tmp_path / "run")
    saved["method"]["options"]["alpha"] = 16  # as if the run had started when olora's default alpha was 16
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(EvoloraError, match=r"--resume: method.options.alpha is 32 here but 16 in "):
        check_resume_config(build_config(raw), tmp_path / "run")
    saved["method"]["options"] = {}  # a folder written before options were spelled out
    path.write_text(yaml.safe_dump(saved))
    check_resume_config(build_config(raw), tmp_path / "run")


def test_corrupt_checkpoint_is_refused_by_name(tmp_path, tiny_config):
    from evolora.reload import evaluate_run

    run(build_config(tiny_config(tmp_path)))
    run_dir = tmp_path / "run"
    evaluate_run(run_dir)
    path = checkpoint_path(run_dir, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EvoloraError, match=r"stage-02.safetensors: checkpoint is corrupt \(checksum mismatch\)"):
        evaluate_run(run_dir)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(EvoloraError, match="checkpoint is corrupt"):
        evaluate_run(run_dir)


class NanAtStage2(SeqLoRA):
    name = "nan_for_tests"

    def loss_terms(self, step, ctx):
        if step.stage == 1 and step.batch.n_tokens:
            return {"boom": torch.tensor(float("nan"))}
        return {}


def test_nan_loss_stops_naming_task_and_step_and_keeps_last_checkpoint(tmp_path, tiny_config):
    register(NanAtStage2)
    try:
        with pytest.raises(EvoloraError, match=r"loss is nan at stage 2 \(demo_place\), step 0"):
            run(build_config(tiny_config(tmp_path, "nan_for_tests")))
    finally:
        METHODS.pop("nan_for_tests")
    run_dir = tmp_path / "run"
    progress = read_progress(run_dir)
    assert len(progress["R"]) == 1
    from evolora.engine.state import sha256_file

    assert sha256_file(checkpoint_path(run_dir, 0)) == progress["checkpoints"]["stage-01.safetensors"]


def test_full_disk_while_saving_leaves_previous_checkpoint(tmp_path, tiny_config, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second stage's checkpoint: half a file, then ENOSPC
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    raw = tiny_config(tmp_path, train={"checkpoint_every": 0})
    with pytest.raises(EvoloraError, match=r"stage-02.safetensors: could not be written \(no space left on device\)"):
        run(build_config(raw))
    run_dir = tmp_path / "run"
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["stage-01.safetensors"]  # no partial or temporary file
    progress = read_progress(run_dir)
    from evolora.engine.state import sha256_file

    assert sha256_file(checkpoint_path(run_dir, 0)) == progress["checkpoints"]["stage-01.safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert run(build_config(raw), resume=True)["complete"]


def test_same_seed_gives_identical_metrics(tmp_path, tiny_config):
    a = run(build_config(tiny_config(tmp_path / "a")))
    b = run(build_config(tiny_config(tmp_path / "b")))

    def strip(m):
        m = json.loads(json.dumps(m))
        m.pop("timings")
        for stage in m["stages"]:
            stage.pop("eval_s")
            for key in ("seconds", "tokens_per_s"):
                stage["train"].pop(key)
        return m

    assert strip(a) == strip(b)
    la = (tmp_path / "a" / "run" / "steps.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "run" / "steps.jsonl").read_text().splitlines()
    assert [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in la] == \
        [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lb]


def test_pickle_only_model_folder_is_refused(tmp_path):
    from evolora.config import ModelConfig
    from evolora.models import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(EvoloraError, match="holds only pickle weights"):
        load_model(ModelConfig(name=str(folder)))


@pytest.mark.parametrize("method_name", ["seq_lora", "cmoe", "moe_cl"])
def test_crash_during_evaluation_resumes_by_evaluating_the_trained_stage(tmp_path, tiny_config, monkeypatch,
                                                                         method_name):
    import evolora.engine.runner as engine

    raw = tiny_config(tmp_path, method_name, output={"keep_checkpoints": "last"})
    reference = run(build_config({**raw, "output": {**raw["output"], "dir": str(tmp_path / "ref")}}))

    run_crashing_in_evaluation(build_config(raw), monkeypatch, stage=2)
    run_dir = tmp_path / "run"
    progress = read_progress(run_dir)
    assert len(progress["R"]) == 1 and progress["trained"]["stage"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["stage-02.safetensors"]

    monkeypatch.setattr(engine, "train_stage", lambda *a, **k: pytest.fail("a trained stage was trained again"))
    logs = []
    resumed = engine.run(build_config(raw), resume=True, log=logs.append)
    assert any("stage 2 was trained and is evaluated now" in line for line in logs)
    assert comparable(resumed) == comparable(reference)
    assert resumed["stages"][1]["train"]["steps"] == reference["stages"][1]["train"]["steps"]
    assert read_progress(run_dir)["trained"] is None
    # the method's per-stage figures (locator fit time, discriminator accuracy) survive the resume
    figures = [sorted(stage["train"].get("method", {})) for stage in resumed["stages"]]
    assert figures == [sorted(stage["train"].get("method", {})) for stage in reference["stages"]]
    expected = {"seq_lora": [], "cmoe": ["locator_fit_s"],
                "moe_cl": ["discriminator_train_accuracy", "locator_fit_s"]}[method_name]
    assert figures == [expected] * len(resumed["stages"])


@pytest.mark.parametrize("method_name,options", [("per_task_lora", {"dropout": 0.1}), ("seq_lora", {"dropout": 0.1}),
                                                 ("cmoe", {}), ("ewc", {})])
@pytest.mark.parametrize("crash", ["evaluation", "next stage"])
def test_a_run_resumed_at_a_stage_boundary_draws_what_the_uninterrupted_run_drew(tmp_path, tiny_config, monkeypatch,
                                                                                 method_name, options, crash):
    """progress.json keeps the random number generators' states at every stage boundary: a run that crashed in
    stage 2's evaluation, or just after it, and resumed trains stage 3 from the same draws (dropout masks, a
    new adapter's initialisation) as the uninterrupted run, to the same weights bit for bit. (EWC: its loaded
    Fisher sums the penalty in the order the uninterrupted run did.)"""
    import evolora.engine.runner as engine
    from safetensors.torch import load_file

    def raw(name):
        return tiny_config(tmp_path / name, method_name, method={"options": options},
                           data={"max_tasks": 3, "train_per_label": 4}, train={"lr": 5e-2})

    reference = run(build_config(raw("whole")))
    if crash == "evaluation":
        run_crashing_in_evaluation(build_config(raw("crashed")), monkeypatch, stage=2)
    else:
        def crash_once_stage_2_is_recorded(line):
            if line.startswith("stage 2/3"):  # logged once progress.json holds stage 2's evaluation
                raise CrashedInEvaluation()

        with pytest.raises(CrashedInEvaluation):
            engine.run(build_config(raw("crashed")), log=crash_once_stage_2_is_recorded)
        assert len(read_progress(tmp_path / "crashed" / "run")["R"]) == 2
    resumed = engine.run(build_config(raw("crashed")), resume=True, log=lambda _: None)
    assert [s["train"]["final_loss"] for s in resumed["stages"]] == [s["train"]["final_loss"] for s in reference["stages"]]
    assert comparable(resumed) == comparable(reference)
    ours, theirs = (load_file(checkpoint_path(tmp_path / name / "run", 2)) for name in ("crashed", "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_unreadable_random_state_in_progress_is_refused_by_name(tmp_path, tiny_config, monkeypatch):
    import evolora.engine.runner as engine

    raw = tiny_config(tmp_path, data={"max_tasks": 3, "train_per_label": 4})
    run_crashing_in_evaluation(build_config(raw), monkeypatch, stage=2)
    progress_file = tmp_path / "run" / "progress.json"
    progress = json.loads(progress_file.read_text())
    progress_file.write_text(json.dumps({**progress, "rng": {"torch": "not base64!"}}))
    with pytest.raises(EvoloraError, match="progress.json: its random number generator state is unreadable"):
        engine.run(build_config(raw), resume=True, log=lambda _: None)


@pytest.mark.parametrize("layout", ["current", "earlier"])
def test_a_step_state_restores_the_random_states_it_saved(tmp_path, layout):
    """A step state keeps the generators' states with the rest; one written in the earlier layout (torch's state
    among the tensors, Python's and NumPy's as separate fields), as an interrupted run of an older evolora left
    it, restores them too."""
    import base64
    import random

    import numpy as np
    from transformers import get_scheduler

    from evolora.engine.state import load_tensors, read_step_state, restore_step_state, save_step_state, save_tensors

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=0)
    (tmp_path / "state").mkdir()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    save_step_state(tmp_path, 0, 3, model, optimizer, scheduler, {})
    expected = (torch.rand(4).tolist(), random.random(), np.random.rand())
    record = read_step_state(tmp_path)
    if layout == "earlier":
        tensor_path = tmp_path / "state" / "step.safetensors"
        tensors = load_tensors(tensor_path, record["sha256"])
        rng = record.pop("rng")
        tensors["rng.torch"] = torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8)
        record.update(rng_python=rng["python"], rng_numpy=rng["numpy"],
                      sha256=save_tensors(tensor_path, tensors, {"stage": "0", "step": "3"}))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    restore_step_state(tmp_path, record, model, optimizer, scheduler)
    assert (torch.rand(4).tolist(), random.random(), np.random.rand()) == expected


def test_crash_before_progress_names_the_new_checkpoint_keeps_the_previous_one(tmp_path, tiny_config,
                                                                               monkeypatch):
    import evolora.engine.runner as engine

    raw = tiny_config(tmp_path, output={"keep_checkpoints": "last"}, train={"checkpoint_every": 0})
    real_write_progress = engine.write_progress

    def crashing_write_progress(run_dir, progress):
        if progress["trained"] is not None and progress["trained"]["stage"] == 1:
            raise CrashedInEvaluation()  # the process dies just after stage 2's checkpoint was written
        real_write_progress(run_dir, progress)

    monkeypatch.setattr(engine, "write_progress", crashing_write_progress)
    with pytest.raises(CrashedInEvaluation):
        run(build_config(raw))
    run_dir = tmp_path / "run"
    assert (checkpoint_path(run_dir, 0)).is_file()  # still there: progress.json resumes from it
    monkeypatch.setattr(engine, "write_progress", real_write_progress)
    logs = []
    assert engine.run(build_config(raw), resume=True, log=logs.append)["complete"]
    assert any("resumed after stage 1/2" in line and "was trained" not in line for line in logs)
