"""The baselines on a tiny model: what trains and what stays frozen across tasks, and their math."""

import pytest
import torch
from conftest import train_through

from evolora.config import build_config
from evolora.engine import StepLog, build_context, run, train_stage
from evolora.methods.ewc import ewc_penalty
from evolora.methods.lwf import distillation
from evolora.methods.olora import orthogonality


def stage_context(tmp_path, tiny_config, method, **options):
    cfg = build_config(tiny_config(tmp_path, method, method={"options": options}, data={"max_tasks": 3}))
    return build_context(cfg, None)


def snapshot(model, needle):
    return {n: p.detach().clone() for n, p in model.named_parameters() if needle in n}


@pytest.mark.parametrize("method_name", ["per_task_lora", "olora"])
def test_old_adapters_frozen_and_unchanged(tmp_path, tiny_config, method_name):
    ctx, method = stage_context(tmp_path, tiny_config, method_name)
    train_through(ctx, method, 1)
    task0 = snapshot(ctx.model, ".task_0.")
    base = snapshot(ctx.model, "base_layer")
    method.grow(1, ctx)
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_1." in n for n in trainable)
    train_stage(ctx, method, 1, ctx.encode_train(1), StepLog(None), 0)
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in task0.items())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if "lora_B.task_1." in n)


def test_per_task_lora_routes_by_task_id(tmp_path, tiny_config):
    ctx, method = stage_context(tmp_path, tiny_config, "per_task_lora")
    train_through(ctx, method, 2)
    ids = torch.tensor([[1, 40, 50, 60]], device=ctx.device)
    outputs = {}
    for task in (0, 1, 2):
        with method.route(task), torch.no_grad():
            outputs[task] = ctx.model(input_ids=ids).logits
    assert not torch.allclose(outputs[0], outputs[1])
    with ctx.model.disable_adapter(), torch.no_grad():
        assert torch.allclose(outputs[2], ctx.model(input_ids=ids).logits)  # untrained task: the base model


def test_olora_defaults_are_the_reference_lora(tmp_path, tiny_config):
    """No options: the reference's LoRA on the attention's q and v projections, alpha 32, dropout 0.1."""
    ctx, method = stage_context(tmp_path, tiny_config, "olora")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in ctx.model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}
    layer = next(m for m in ctx.model.modules() if hasattr(m, "lora_dropout") and "task_0" in m.lora_dropout)
    assert layer.scaling["task_0"] == 32 / 8 and layer.lora_dropout["task_0"].p == 0.1


def test_olora_orthogonality_term():
    a = torch.eye(4)[:2]  # rows e0, e1
    b = torch.eye(4)[2:]  # rows e2, e3: orthogonal to a
    assert orthogonality([a], b).item() == 0.0
    assert orthogonality([a], a + b).item() > 0.0
    assert orthogonality([], b).item() == 0.0


def test_olora_loss_term_reaches_only_the_new_adapter(tmp_path, tiny_config):
    ctx, method = stage_context(tmp_path, tiny_config, "olora", lambda_orth=1.0, lambda_l2=0.1)
    train_through(ctx, method, 1)
    method.grow(1, ctx)
    terms = method.loss_terms(None, ctx)
    assert set(terms) == {"orthogonality", "l2"} and terms["orthogonality"].item() > 0
    # the reference's L2: λ2 times the sum of the new adapter's matrices' (unsquared) Frobenius norms
    new = [p for n, p in ctx.model.named_parameters() if ".task_1." in n]
    assert new and terms["l2"].item() == pytest.approx(0.1 * sum(p.detach().norm().item() for p in new), rel=1e-5)
    sum(terms.values()).backward()
    for name, p in ctx.model.named_parameters():
        if ".task_0." in name:
            assert p.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ctx.model.named_parameters()
               if "lora_A.task_1." in n)


def test_ewc_penalty_is_zero_at_the_old_optimum_and_grows_away():
    theta = {"w": torch.tensor([1.0, -2.0])}
    fisher = {"w": torch.tensor([3.0, 0.5])}
    assert ewc_penalty(theta, fisher, {"w": theta["w"].clone()}).item() == 0.0
    moved = {"w": torch.tensor([2.0, -2.0])}
    assert ewc_penalty(moved, fisher, theta).item() == pytest.approx(0.5 * 3.0 * 1.0)


def test_ewc_fisher_after_task_and_checkpoint_roundtrip(tmp_path, tiny_config):
    ctx, method = stage_context(tmp_path, tiny_config, "ewc", lambda_ewc=10.0)
    train_through(ctx, method, 1)
    assert method.fisher and all(f.min() >= 0 for f in method.fisher.values())
    assert any(f.sum() > 0 for f in method.fisher.values())
    params = dict(ctx.model.named_parameters())
    assert method.loss_terms(None, ctx)["ewc"].item() == pytest.approx(0.0)
    state = method.checkpoint_state(ctx.model)
    fisher = {k: v.clone() for k, v in method.fisher.items()}
    method.fisher, method.anchor = {}, {}
    method.load_checkpoint_state(ctx.model, state)
    assert all(torch.equal(fisher[k], method.fisher[k]) for k in fisher)
    with torch.no_grad():
        next(p for n, p in params.items() if n in method.fisher).add_(1.0)
    assert method.loss_terms(None, ctx)["ewc"].item() > 0


def test_replay_mixes_a_fixed_buffer_of_earlier_tasks(tmp_path, tiny_config):
    ctx, method = stage_context(tmp_path, tiny_config, "replay", per_task=3)
    first = method.training_examples(0, ctx.encode_train(0), ctx)
    assert len(first) == len(ctx.tasks[0].train)
    third = method.training_examples(2, ctx.encode_train(2), ctx)
    assert len(third) == len(ctx.tasks[2].train) + 6
    assert sorted({e.task_index for e in third}) == [0, 1, 2]
    again = method.training_examples(2, ctx.encode_train(2), ctx)
    assert [e.input_ids for e in again] == [e.input_ids for e in third]


def test_lwf_distillation_is_minimal_at_the_teacher():
    torch.manual_seed(0)
    teacher_logits = torch.randn(1, 2, 10)
    top = torch.log_softmax(teacher_logits, -1).topk(10, dim=-1)
    labels = torch.tensor([[5, 7]])
    same = distillation(teacher_logits, labels, top.indices, top.values, temperature=1.0)
    other = distillation(torch.randn(1, 2, 10), labels, top.indices, top.values, temperature=1.0)
    assert same < other
    masked = distillation(teacher_logits, torch.tensor([[-100, -100]]), top.indices, top.values, 1.0)
    assert masked.item() == 0.0


def test_lwf_distillation_on_top_k_keeps_the_rest_of_the_vocabulary():
    torch.manual_seed(0)
    teacher_logits = torch.randn(2, 3, 50) * 3
    labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
    full = torch.log_softmax(teacher_logits / 2.0, -1)
    top = full.topk(5, dim=-1)
    student_logits = teacher_logits.clone().requires_grad_(True)
    at_teacher = distillation(student_logits, labels, top.indices, top.values, temperature=2.0)
    at_teacher.backward()
    assert at_teacher.item() == pytest.approx(0.0, abs=1e-5)
    # At the teacher the loss is at its minimum: no pull on the tokens outside the top-k.
    assert student_logits.grad.abs().max().item() < 1e-5
    assert distillation(torch.randn(2, 3, 50), labels, top.indices, top.values, 2.0) > 0
    # With k = the vocabulary it is the exact KL, times T^2.
    everything = full.topk(50, dim=-1)
    student = torch.randn(2, 3, 50)
    exact = torch.nn.functional.kl_div(torch.log_softmax(student / 2.0, -1), full, log_target=True,
                                       reduction="none").sum(-1)
    expected = exact[labels != -100].mean() * 4.0
    got = distillation(student, labels, everything.indices, everything.values, 2.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("method_name", ["replay", "ewc", "lwf", "per_task_lora", "olora"])
def test_every_baseline_runs_end_to_end(tmp_path, tiny_config, method_name):
    metrics = run(build_config(tiny_config(tmp_path, method_name)))
    assert metrics["complete"] and len(metrics["R"]) == 2
    assert metrics["parameters"]["added"] > 0


def test_adding_lora_shows_the_user_no_upstream_deprecation_warning():
    """peft reads transformers' deprecated `is_gradient_checkpointing`; every LoRA run printed its FutureWarning."""
    import warnings

    from evolora.methods.base import LoraOptions
    from evolora.methods.seq_lora import add_lora
    from evolora.models import tiny_llama

    model, _ = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        peft_model = add_lora(model, LoraOptions())
    assert peft_model.peft_config["default"].r == LoraOptions().r
