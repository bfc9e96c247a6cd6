"""eval.cache: a task whose answering tensors did not change since it was scored is not scored again, and R is
the same with the cache on or off."""

import pytest
import torch
from conftest import run_crashing_in_evaluation

from evolora.config import build_config
from evolora.engine import run
from evolora.engine.scoring import fingerprint


def run_with_cache(tmp_path, tiny_config, method, cache, options=None, **data):
    raw = tiny_config(tmp_path / str(cache), method, method={"options": options or {}},
                      data={"max_tasks": 3, **data}, eval={"cache": cache, "future_tasks": "all"})
    return run(build_config(raw), log=lambda _: None)


@pytest.mark.parametrize("method,options,reused", [
    ("per_task_lora", {}, [0, 2, 2]),  # all but the task just trained: frozen adapters before it, the base model after
    # frozen task experts and gates, and each old task reads its frozen shared snapshot: only the new task and the
    # not-yet-trained ones (the live shared expert) are scored again
    ("moe_cl", {"variant": "evolora", "reassign_examples": 0, "locator_vae_steps": 10}, [0, 1, 2]),
    ("moe_cl", {"locator_vae_steps": 10}, [0, 0, 0]),  # the reference form: the layer gates and the shared expert train every stage
    ("seq_lora", {}, [0, 0, 0]),            # nothing declared: every task is scored every time
])
def test_cache_reuses_unchanged_tasks_and_gives_the_same_R(tmp_path, tiny_config, method, options, reused):
    on = run_with_cache(tmp_path, tiny_config, method, True, options)
    off = run_with_cache(tmp_path, tiny_config, method, False, options)
    assert on["R"] == off["R"] and on["metrics"] == off["metrics"]
    assert [s["eval_reused"] for s in on["stages"]] == reused
    assert [s["eval_reused"] for s in off["stages"]] == [0, 0, 0]


def test_fingerprint_changes_with_any_bit_of_any_tensor():
    state = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    same = {"b": torch.ones(2, dtype=torch.bfloat16), "a": torch.zeros(3)}
    assert fingerprint(state) == fingerprint(same)
    nudged = {"a": torch.tensor([0.0, torch.finfo(torch.float32).tiny, 0.0]), "b": state["b"]}
    assert fingerprint(nudged) != fingerprint(state)
    assert fingerprint({"a": torch.zeros(3, 1), "b": state["b"]}) != fingerprint(state)
    assert fingerprint({"c": torch.zeros(3), "b": state["b"]}) != fingerprint(state)


def test_the_dev_split_is_scored_beside_test_and_never_answered_from_the_test_cache(tmp_path, tiny_config):
    """data.dev_per_label: the final model is scored on each task's dev split too (kept as metrics.json's `dev`),
    with the eval cache on; the dev figure is the dev split's own, not a cached test score."""
    raw = tiny_config(tmp_path, "per_task_lora", data={"dev_per_label": 2, "train_per_label": 6},
                      eval={"cache": True})
    record = run(build_config(raw), log=lambda _: None)
    dev = record["dev"]
    tasks = record["stream"]["tasks"]
    assert sorted(dev["n"]) == sorted(tasks) and all(n >= 4 for n in dev["n"].values())
    assert dev["AP"] == pytest.approx(sum(dev["R_final"]) / len(tasks))
    from evolora.reload import load_run

    ctx, method = load_run(tmp_path / "run")
    from evolora.engine.scoring import evaluate_dev

    assert evaluate_dev(ctx, method)["R_final"] == dev["R_final"]  # a fresh evaluation, no cache: the same figures


def test_evolora_eval_of_a_finished_run_reproduces_its_final_row_made_with_the_cache(tmp_path, tiny_config):
    """The last row of R, partly answered from the cache during the run, equals a fresh evaluation of the final
    checkpoint (`evolora eval`, which scores every task)."""
    import json

    from typer.testing import CliRunner

    from evolora.cli import app

    on = run_with_cache(tmp_path, tiny_config, "per_task_lora", True)
    assert on["stages"][-1]["eval_reused"] > 0
    run_dir = tmp_path / "True" / "run"
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert [evaluated["accuracy"][t] for t in on["stream"]["tasks"]] == on["R"][-1]


@pytest.mark.parametrize("damage", [None, "foreign", "corrupt"])
def test_a_resumed_run_keeps_its_eval_cache_and_gives_the_same_R(tmp_path, tiny_config, monkeypatch, damage):
    """The cache is kept in the run folder after every stage's evaluation: a run that resumes re-scores only
    what changed, as the uninterrupted run did. A cache file made under other settings, or unreadable, is
    ignored (every task is scored again) and R is still the same."""
    import json

    import evolora.engine.runner as engine

    reference = run_with_cache(tmp_path / "ref", tiny_config, "per_task_lora", True)
    assert [s["eval_reused"] for s in reference["stages"]] == [0, 2, 2]

    raw = tiny_config(tmp_path, "per_task_lora", data={"max_tasks": 3}, eval={"cache": True, "future_tasks": "all"})
    run_crashing_in_evaluation(build_config(raw), monkeypatch, stage=3)
    kept = tmp_path / "run" / "state" / "eval-cache-0of1.json"
    stored = json.loads(kept.read_text())
    assert sorted(stored["entries"]) == ["0", "1", "2"]
    if damage == "foreign":
        kept.write_text(json.dumps({**stored, "scope": "0" * 64}))
    elif damage == "corrupt":
        kept.write_text('{"scope": ')

    logs = []
    resumed = engine.run(build_config(raw), resume=True, log=logs.append)
    assert resumed["R"] == reference["R"] and resumed["metrics"] == reference["metrics"]
    reused = [s["eval_reused"] for s in resumed["stages"]]
    assert reused == ([0, 2, 2] if damage is None else [0, 2, 0])
    assert any("3 task scores kept for the eval cache" in line for line in logs) == (damage is None)
