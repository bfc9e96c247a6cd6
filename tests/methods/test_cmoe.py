"""CMoE and the task locator on tiny models and synthetic features."""

import json

import pytest
import torch
from conftest import train_through

from evolora.config import build_config
from evolora.engine import build_context, run
from evolora.errors import DataError, EvoloraError
from evolora.methods.cmoe import expansion_decision, load_balance, top_k_weights
from evolora.methods.locator import TaskLocator


def test_expansion_decision_on_synthetic_frequencies():
    freqs = [0.10, 0.50, 0.30, 0.05, 0.45]  # mean 0.28, std ~0.18
    assert expansion_decision(freqs, 0.0) == [1, 2, 4]
    assert expansion_decision(freqs, 1.0) == [0, 1, 2, 4]  # threshold 0.28 - 0.18 = 0.099: 0.10 is just above
    assert expansion_decision(freqs, -1.0) == [1]          # only clearly busy layers
    assert expansion_decision([0.2, 0.2, 0.2], 0.5) == [0, 1, 2]  # all equal and used: all expand
    assert expansion_decision([0.0, 0.0], 0.5) == []


def test_top_k_weights_and_balance_loss():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    weights, probs = top_k_weights(logits, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 1))
    assert (weights[..., 2:] == 0).all() and weights[0, 0, 0] > weights[0, 0, 1] > 0
    assert torch.allclose(probs.sum(-1), torch.ones(1, 1))
    uniform = torch.full((1, 8, 4), 0.25)
    assert load_balance(uniform, uniform, torch.ones(1, 8)).item() == pytest.approx(1.0)  # balanced: E * E * 1/E^2
    skewed = torch.zeros(1, 8, 4)
    skewed[..., 0] = 1
    assert load_balance(skewed, skewed, torch.ones(1, 8)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("kind", ["gaussian", "vae"])
def test_locator_separates_clusters_and_z_scoring_handles_scale(kind):
    torch.manual_seed(0)
    dim = 24
    centers = [torch.zeros(dim), torch.full((dim,), 3.0), torch.cat([torch.full((12,), -3.0), torch.zeros(12)])]
    scales = [0.05, 1.0, 0.3]  # very different spreads: raw distances would favour the widest task
    locator = TaskLocator(dim, rank=4)
    tests = []
    for t, (c, s) in enumerate(zip(centers, scales)):
        locator.add_task()
        locator.fit(t, c + s * torch.randn(300, dim))
        tests.append(c + s * torch.randn(100, dim))
    for t, x in enumerate(tests):
        accuracy = (locator.locate(x, kind) == t).float().mean().item()
        assert accuracy >= 0.97, (kind, t, accuracy)


def cmoe_config(tmp_path, tiny_config, **options):
    options.setdefault("probe_fraction", 0.5)
    return build_config(tiny_config(tmp_path, "cmoe", method={"options": options}, data={"max_tasks": 3},
                                    train={"lr": 5e-2}))


def test_old_experts_and_routers_unchanged_and_only_new_ones_train(tmp_path, tiny_config):
    ctx, method = build_context(cmoe_config(tmp_path, tiny_config, expand_alpha=5.0), None)
    base = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if id(p) in method.base_parameter_ids}

    train_through(ctx, method, 1)
    old = [p.detach().clone() for layer in range(len(method.experts.layers))
           for p in method.experts.expert_parameters(layer, 0)]
    routers0 = [r[0].weight.detach().clone() for r in method.container.routers]
    train_through(ctx, method, 2, start=1)
    assert method.plan[1]["expanded"]  # alpha 5: every layer the probe reached expands
    now = [p for layer in range(len(method.experts.layers)) for p in method.experts.expert_parameters(layer, 0)]
    assert all(torch.equal(a, b) for a, b in zip(old, now))
    assert all(torch.equal(a, r[0].weight) for a, r in zip(routers0, method.container.routers))
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)
    trainable = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
    assert trainable and all("routers" in n and ".1." in n or "lora_" in n for n in trainable)
    assert method.experts.num_experts(method.plan[1]["expanded"][0]) == 2
    # the new expert started as a copy of the layer's most-used expert, then trained away from it
    layer = method.plan[1]["expanded"][0]
    assert method.plan[1]["copied_from"][str(layer)] == 0


def test_run_save_load_same_predictions_and_predict(tmp_path, tiny_config):
    from evolora.reload import load_run, predict, read_inputs

    cfg = cmoe_config(tmp_path, tiny_config)
    record = run(cfg)
    assert record["locate"]["locator_by_kind"].keys() == {"gaussian", "vae"}
    assert (tmp_path / "run" / "cmoe_plan.json").is_file()
    expansion = record["method_metrics"]["expansion"]
    assert len(expansion) == 3 and expansion[0]["expanded_layers"] == [0, 1]
    # every evaluated example's prediction is kept, and the saved predictions give the recorded accuracies
    names = record["stream"]["tasks"]
    for label, row in [*((f"stage-{s + 1:02d}", r) for s, r in enumerate(record["R"])),
                       ("final-located", record["locate"]["R_final"])]:
        lines = [json.loads(x) for x in (tmp_path / "run" / "predictions" / f"{label}.jsonl").read_text().splitlines()]
        assert {x["eval"] for x in lines} == {label}
        for j, name in enumerate(names):
            mine = [x for x in lines if x["task"] == name]
            if row[j] is None:
                assert not mine
                continue
            assert [x["index"] for x in mine] == list(range(len(mine))) and mine
            assert all(x["correct"] == (x["prediction"] == x["gold"]) for x in mine)
            assert 100.0 * sum(x["correct"] for x in mine) / len(mine) == pytest.approx(row[j])
    ctx, method = load_run(tmp_path / "run")
    assert [method.experts.num_experts(i) for i in range(2)] == record["method_metrics"]["experts_per_layer"]
    inputs = tmp_path / "inputs.jsonl"
    task = ctx.tasks[1]
    inputs.write_text("".join(json.dumps({"input": ex.input}) + "\n" for ex in task.test[:3]), encoding="utf-8")
    first = predict(tmp_path / "run", read_inputs(inputs))
    second = predict(tmp_path / "run", read_inputs(inputs))
    assert first == second and all(r["task"] in {t.name for t in ctx.tasks} for r in first)
    oracle = predict(tmp_path / "run", read_inputs(inputs), task=task.name)
    assert all(r["task"] == task.name and r["answer"] in task.labels for r in oracle)
    with pytest.raises(EvoloraError, match="not a task of this run"):
        predict(tmp_path / "run", read_inputs(inputs), task="nope")


def test_predict_bad_file_names_the_line(tmp_path):
    from evolora.reload import read_inputs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine"}\n{"inpt": "typo"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing key 'input'"):
        read_inputs(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "fine"}\n{"input": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        read_inputs(broken)


def test_predict_cli_one_line_error(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": 3}\n', encoding="utf-8")
    run_dir = tmp_path / "missing_run"
    proc = subprocess.run([sys.executable, "-m", "evolora", "predict", str(run_dir), "--file", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bad.jsonl:1: 'input' must be a string" in proc.stderr


def test_locate_mode_for_a_method_without_locator_is_one_line(tmp_path, tiny_config):
    cfg = build_config(tiny_config(tmp_path, "seq_lora", eval={"task_id": "locate"}))
    with pytest.raises(EvoloraError, match="eval.task_id: locate needs a method with a task locator"):
        run(cfg)


def test_moe_cl_in_locate_mode_throughout(tmp_path, tiny_config):
    cfg = build_config(tiny_config(tmp_path, "moe_cl", eval={"task_id": "locate"}))
    record = run(cfg)
    assert all("locator" in s for s in record["stages"]) and record["locate"] is None


@pytest.mark.parametrize("pool,layer", [("last", -1), ("mean", None), ("mean", 0)])
def test_locator_feature_is_the_unpadded_hidden_state(tmp_path, tiny_config, pool, layer):
    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"name": "moe_cl", "options": {
        "locator_pool": pool, "locator_layer": layer}}))
    ctx, method = build_context(cfg, None, log=lambda _: None)
    n_layers = ctx.model.config.num_hidden_layers
    assert method.locator_layer == (round(2 * n_layers / 3) if layer is None else layer)
    prompts = [ctx.prompts.encode_prompt(ctx.tasks[0], ex, 0).input_ids for ex in ctx.tasks[0].test[:3]]
    assert len({len(p) for p in prompts}) > 1  # batched with left padding
    batched = method.features(ctx, prompts)
    with torch.no_grad(), method.experts.disabled():
        for row, ids in zip(batched, prompts):
            out = ctx.model(input_ids=torch.tensor([ids], device=ctx.device), output_hidden_states=True)
            hidden = out.hidden_states[method.locator_layer][0]
            expected = hidden.mean(0) if pool == "mean" else hidden[-1]
            torch.testing.assert_close(row.cpu(), expected.float().cpu(), atol=1e-4, rtol=1e-4)


def test_unknown_locator_pool_is_one_line(tmp_path, tiny_config):
    with pytest.raises(EvoloraError, match="locator_pool"):
        build_context(build_config(tiny_config(tmp_path, "cmoe", method={"name": "cmoe",
                                                                          "options": {"locator_pool": "max"}})), None)


def test_locator_layer_out_of_range_is_one_line(tmp_path, tiny_config):
    cfg = build_config(tiny_config(tmp_path, "cmoe", method={"name": "cmoe", "options": {"locator_layer": 9}}))
    with pytest.raises(EvoloraError, match=r"method.options.locator_layer: 9 is out of range for a model with 2 "):
        build_context(cfg, None, log=lambda _: None)


def test_eval_refits_the_locator_with_new_options_as_fitting_during_the_run_would(tmp_path, tiny_config):
    from evolora.reload import evaluate_run

    options = {"locator_pool": "mean", "locator_layer": 1, "locator_rank": 4}
    first = tiny_config(tmp_path / "a", "cmoe", method={"options": {"locator_pool": "last", "locator_layer": -1}})
    run(build_config(first))
    direct = run(build_config(tiny_config(tmp_path / "b", "cmoe", method={"options": options})))
    refit = evaluate_run(tmp_path / "a" / "run", ["eval.task_id=locate"]
                         + [f"method.options.{k}={v}" for k, v in options.items()])
    assert refit["locator"] == pytest.approx(direct["locate"]["locator"])
    assert refit["locator_by_kind"] == pytest.approx(direct["locate"]["locator_by_kind"])
    assert refit["mean"] == pytest.approx(direct["locate"]["AP"])
    assert refit["overrides"][0] == "eval.task_id=locate"
    run(build_config(tiny_config(tmp_path / "c")))
    with pytest.raises(EvoloraError, match="method.options.locator_pool: unknown option for seq_lora"):
        evaluate_run(tmp_path / "c" / "run", ["method.options.locator_pool=mean"])
