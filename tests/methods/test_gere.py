"""GeRe: the threshold-margin loss, thresholds, compact states, and the add-on on real runs."""

import json

import pytest
import torch

from evolora.config import build_config
from evolora.engine import run
from evolora.errors import ConfigError
from evolora.methods.gere import (NEGATIVE, NEUTRAL, POSITIVE, classify, pack_states, thresholds, tm_loss,
                                  unpack_states)

TAU_POS, TAU_NEG = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])


def test_tm_loss_positive_entries():
    states = torch.tensor([[POSITIVE, POSITIVE]], dtype=torch.uint8)
    # 0.5 below tau+ is violated by 0.5; 2.0 is inside the positive region
    assert tm_loss(torch.tensor([[0.5, 2.0]]), states, TAU_POS, TAU_NEG).item() == pytest.approx(0.5)


def test_tm_loss_negative_entries():
    states = torch.tensor([[NEGATIVE, NEGATIVE]], dtype=torch.uint8)
    assert tm_loss(torch.tensor([[0.0, -3.0]]), states, TAU_POS, TAU_NEG).item() == pytest.approx(1.0)


def test_tm_loss_neutral_entries_both_sides_and_averaged_over_violations_only():
    states = torch.full((1, 4), NEUTRAL, dtype=torch.uint8)
    h = torch.tensor([[1.5, -1.25, 0.0, 0.9]])  # 0.5 above tau+, 0.25 below tau-, two inside
    tau_pos, tau_neg = torch.ones(4), -torch.ones(4)
    assert tm_loss(h, states, tau_pos, tau_neg).item() == pytest.approx((0.5 + 0.25) / 2)


def test_tm_loss_zero_at_the_reference_and_gradient_pushes_back():
    torch.manual_seed(0)
    h0 = torch.randn(50, 8)
    tau_pos, tau_neg = thresholds(h0, 1.0)
    states = classify(h0, tau_pos, tau_neg)
    assert tm_loss(h0, states, tau_pos, tau_neg).item() == 0.0
    moved = (h0 * 0.0).requires_grad_(True)  # everything collapses to 0: positives and negatives violate
    loss = tm_loss(moved, states, tau_pos, tau_neg)
    loss.backward()
    assert loss.item() > 0
    assert (moved.grad[states == POSITIVE] <= 0).all() and (moved.grad[states == NEGATIVE] >= 0).all()
    assert (moved.grad[states == NEUTRAL] == 0).all()


def test_thresholds_against_direct_computation():
    torch.manual_seed(1)
    h = torch.randn(200, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + torch.tensor([0.0, 1.0, -2.0, 0.0, 5.0])
    k = 1.5
    tau_pos, tau_neg = thresholds(h, k)
    for j in range(5):
        col = [float(v) for v in h[:, j]]
        mean = sum(col) / len(col)
        std = (sum((v - mean) ** 2 for v in col) / len(col)) ** 0.5
        assert tau_pos[j].item() == pytest.approx(mean + k * std, rel=1e-5)
        assert tau_neg[j].item() == pytest.approx(mean - k * std, rel=1e-5)


def test_packed_states_roundtrip_and_are_16x_smaller_than_fp32_hidden_states():
    torch.manual_seed(2)
    h = torch.randn(37, 577)  # a width that is not a multiple of 4
    tau_pos, tau_neg = thresholds(h, 1.0)
    states = classify(h, tau_pos, tau_neg)
    packed = pack_states(states)
    assert torch.equal(unpack_states(packed, 577), states)
    assert packed.dtype == torch.uint8
    assert h.numel() * 4 / packed.numel() >= 8  # the bar; 2 bits an entry gives ~16x


def general_file(tmp_path, n=12):
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": f"general sentence {i} about the weather and the sea."}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


@pytest.mark.parametrize("loss", ["tm", "ce", "kl", "l1", "l2"])
def test_gere_composes_with_seq_lora_for_every_loss(tmp_path, tiny_config, loss):
    texts = general_file(tmp_path)
    raw = tiny_config(tmp_path, "seq_lora", method={"addons": {"gere": {"texts": str(texts), "loss": loss,
                                                                         "max_tokens": 32}}})
    record = run(build_config(raw))
    assert record["method"] == "seq_lora+gere"
    assert record["method_metrics"]["gere_loss"] == loss
    logged = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all("general_ce" in r for r in logged)
    if loss != "ce":
        assert any(r[f"general_{loss}"] > 0 for r in logged)


def test_gere_on_seq_ft_keeps_states_compact(tmp_path, tiny_config):
    texts = general_file(tmp_path)
    raw = tiny_config(tmp_path, "seq_ft", method={"addons": {"gere": {"texts": str(texts), "weight": 1.0}}})
    record = run(build_config(raw))
    extra = record["method_metrics"]
    assert extra["gere_hidden_fp32_bytes"] / extra["gere_state_bytes"] >= 8


def test_gere_without_texts_samples_them_from_the_base_model(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "cache"))
    raw = tiny_config(tmp_path, "seq_lora", method={"addons": {"gere": {"num_texts": 6, "max_tokens": 12}}})
    record = run(build_config(raw))
    assert record["method_metrics"]["gere_texts"] >= 1
    cached = list((tmp_path / "cache" / "general_synth").glob("*.jsonl"))
    assert len(cached) == 1 and 1 <= len(cached[0].read_text().splitlines()) <= 6


def test_bad_addon_config_is_one_line(tmp_path, tiny_config):
    from evolora.methods import validate_method_options

    with pytest.raises(ConfigError, match=r"method.addons.nope: unknown add-on"):
        validate_method_options(build_config(tiny_config(tmp_path, "seq_lora", method={"addons": {"nope": {}}})).method)
    with pytest.raises(ConfigError, match=r"method.addons.gere.loss"):
        validate_method_options(build_config(tiny_config(tmp_path, "seq_lora",
                                                         method={"addons": {"gere": {"loss": "mse"}}})).method)


def test_gere_on_moe_cl_runs(tmp_path, tiny_config):
    texts = general_file(tmp_path)
    raw = tiny_config(tmp_path, "moe_cl", method={"options": {"memory_per_task": 2},
                                                  "addons": {"gere": {"texts": str(texts), "max_tokens": 24}}})
    record = run(build_config(raw))
    assert record["method"] == "moe_cl+gere" and record["complete"]
    logged = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all("general_tm" in r and "adversarial" in r for r in logged)


def test_general_weight_scales_the_general_part_and_must_be_positive(tmp_path, tiny_config):
    texts = general_file(tmp_path)
    first_steps = {}
    for scale in (1.0, 0.25):
        out = tmp_path / f"w{scale}"
        raw = tiny_config(out, "seq_lora", method={"addons": {"gere": {"texts": str(texts), "max_tokens": 32,
                                                                       "general_weight": scale}}})
        run(build_config(raw))
        first_steps[scale] = json.loads((out / "run" / "steps.jsonl").read_text().splitlines()[0])
    assert first_steps[0.25]["task_loss"] == pytest.approx(first_steps[1.0]["task_loss"])
    assert first_steps[0.25]["general_ce"] == pytest.approx(0.25 * first_steps[1.0]["general_ce"], rel=1e-4)
    from evolora.methods import validate_method_options

    with pytest.raises(ConfigError, match=r"general_weight"):
        validate_method_options(build_config(tiny_config(tmp_path, "seq_lora",
                                                         method={"addons": {"gere": {"general_weight": 0}}})).method)


def test_defaults_are_the_reference_average_of_the_two_ces_and_proportional_mixing(tmp_path, tiny_config):
    """The reference (w_strategy 'dy'): loss = (task CE + general CE) / 2 + w * TM, w = that average / TM; the
    general texts are spread over the stage so that all of them pass once per stage."""
    texts = general_file(tmp_path, n=12)
    raw = tiny_config(tmp_path, "seq_lora", method={"addons": {"gere": {"texts": str(texts), "max_tokens": 32}}},
                      train={"log_every": 1})
    record = run(build_config(raw))
    steps_per_stage = record["stages"][-1]["train"]["steps"]  # the figure is the last stage's
    assert record["method_metrics"]["gere_per_step"] == -(-12 // steps_per_stage)
    logged = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    violated = [r for r in logged if r["general_tm"] > 0]  # the first step runs the base model: nothing violated
    assert violated
    for r in logged:
        average = (r["task_loss"] + 2 * r["general_ce"]) / 2  # general_ce is logged halved
        assert r["task_ce_halved"] == pytest.approx(-0.5 * r["task_loss"], rel=1e-5)
        assert r["loss"] == pytest.approx(average + r["general_tm"], rel=1e-4)
    for r in violated:
        assert r["general_tm"] == pytest.approx((r["task_loss"] + 2 * r["general_ce"]) / 2, rel=1e-4)
    summed = tiny_config(tmp_path / "sum", "seq_lora", method={"addons": {"gere": {
        "texts": str(texts), "max_tokens": 32, "balance": "sum", "mixing": "per_batch"}}}, train={"log_every": 1})
    run(build_config(summed))
    logged = [json.loads(x) for x in (tmp_path / "sum" / "run" / "steps.jsonl").read_text().splitlines()]
    assert all("task_ce_halved" not in r for r in logged)
    assert all(r["general_tm"] == pytest.approx(r["task_loss"] + r["general_ce"], rel=1e-4)
               for r in logged if r["general_tm"] > 0)


def test_chunked_cross_entropy_equals_one_cross_entropy_in_value_and_gradient():
    from evolora.methods.gere import chunked_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(7, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7, 5))
    targets[2, 3:] = -100
    mine = chunked_cross_entropy(logits, targets, rows=3)
    (grad_mine,) = torch.autograd.grad(mine, logits)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    (grad_plain,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(mine, plain) and torch.allclose(grad_mine, grad_plain)
