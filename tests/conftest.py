from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture
def tiny_config():
    """A raw config dict for a fast run: tiny random Llama, 2 demo tasks, a few examples."""
    def make(tmp_path, method_name="seq_lora", **sections):
        raw = {
            "name": "tiny",
            "model": {"name": "tiny-llama", "dtype": "fp32"},
            "data": {"stream": "demo", "max_tasks": 2, "train_per_label": 4, "test_per_label": 3,
                     "max_input_tokens": 48},
            "method": {"name": method_name, "options": {}},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "seed": 0},
            "eval": {"batch_size": 8},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
        for key, value in sections.items():
            raw[key].update(value)
        if method_name in ("moe_cl", "cmoe"):  # a short locator fit keeps the tiny runs fast
            raw["method"]["options"] = {"locator_vae_steps": 20, **raw["method"]["options"]}
        return raw
    return make


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "cl_benchmark").is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA


def train_through(ctx, method, stop, start=0):
    """Stages start..stop-1 through the method's hooks, as the engine runs them (no evaluation)."""
    from evolora.engine import StepLog, train_stage

    for stage in range(start, stop):
        method.grow(stage, ctx)
        method.before_stage(stage, ctx)
        examples = method.training_examples(stage, ctx.encode_train(stage), ctx)
        train_stage(ctx, method, stage, examples, StepLog(None), 0)
        method.after_stage(stage, ctx)


class CrashedInEvaluation(Exception):
    pass


def run_crashing_in_evaluation(config, monkeypatch, stage: int) -> None:
    """Runs `config` until its engine crashes in stage `stage`'s evaluation (1-based), after that stage's
    checkpoint was saved; the engine's evaluation is real again afterwards."""
    import evolora.engine.runner as engine

    real_evaluate_row, calls = engine.evaluate_row, {"n": 0}

    def crashing_evaluate_row(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stage:
            raise CrashedInEvaluation()
        return real_evaluate_row(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate_row", crashing_evaluate_row)
    with pytest.raises(CrashedInEvaluation):
        engine.run(config, log=lambda _: None)
    monkeypatch.setattr(engine, "evaluate_row", real_evaluate_row)
