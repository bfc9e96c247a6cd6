"""The method hooks on a tiny model: what trains, what stays frozen, the order of hooks."""

import contextlib

import pytest
import torch

from evolora.config import build_config
from evolora.engine import run
from evolora.methods import Method, register
from evolora.methods.registry import METHODS


def snapshot(model, predicate):
    return {n: p.detach().clone() for n, p in model.named_parameters() if predicate(n)}


def test_seq_lora_trains_only_the_adapter(tmp_path, tiny_config):
    from evolora.engine import build_context, train_stage, StepLog

    cfg = build_config(tiny_config(tmp_path, "seq_lora", method={"options": {"target_modules": ["up_proj"]}}))
    ctx, method = build_context(cfg, None)
    base = snapshot(ctx.model, lambda n: "lora_" not in n)
    lora = snapshot(ctx.model, lambda n: "lora_B" in n)
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "up_proj" in n for n in trainable)
    train_stage(ctx, method, 0, ctx.encode_train(0), StepLog(None), 0)
    for n, p in ctx.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in ctx.model.named_parameters() if n in lora)


def test_seq_ft_trains_the_base_but_not_embeddings(tmp_path, tiny_config):
    from evolora.engine import build_context, train_stage, StepLog

    cfg = build_config(tiny_config(tmp_path, "seq_ft"))
    ctx, method = build_context(cfg, None)
    before = snapshot(ctx.model, lambda n: True)
    train_stage(ctx, method, 0, ctx.encode_train(0), StepLog(None), 0)
    changed = {n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("mlp" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)


def test_multitask_is_one_joint_stage(tmp_path, tiny_config):
    metrics = run(build_config(tiny_config(tmp_path, "multitask")))
    assert len(metrics["R"]) == 1 and metrics["stages"][0]["tasks"] == ["demo_object", "demo_place"]
    assert set(metrics["metrics"]) == {"AP", "zero_shot_mean"}


class Recorder(Method):
    """Records the engine's hook calls; trains one LoRA-free bias-like parameter."""

    name = "recorder_for_tests"
    calls: list = []

    def setup(self, model, ctx):
        self.calls.append(("setup",))
        self.extra = torch.nn.Parameter(torch.zeros(1))
        model.register_parameter("recorder_extra", self.extra)
        return model

    def grow(self, stage, ctx):
        self.calls.append(("grow", stage))

    def before_stage(self, stage, ctx):
        self.calls.append(("before_stage", stage))

    def training_examples(self, stage, examples, ctx):
        self.calls.append(("training_examples", stage, len(examples)))
        return examples

    def loss_terms(self, step, ctx):
        if ("loss_terms", step.stage) not in self.calls:
            self.calls.append(("loss_terms", step.stage))
        return {"extra_penalty": (self.extra - 1.0).pow(2).sum()}

    def after_stage(self, stage, ctx):
        self.calls.append(("after_stage", stage))

    @contextlib.contextmanager
    def route(self, task_index):
        self.calls.append(("route", task_index))
        yield


def test_engine_calls_hooks_in_order_and_adds_loss_terms(tmp_path, tiny_config):
    register(Recorder)
    try:
        Recorder.calls = []
        raw = tiny_config(tmp_path, "recorder_for_tests", eval={"future_tasks": "none", "zero_shot": False})
        metrics = run(build_config(raw))
    finally:
        METHODS.pop("recorder_for_tests")
    names = [c[0] for c in Recorder.calls]
    assert names == ["setup",
                     "grow", "before_stage", "training_examples", "loss_terms", "after_stage", "route",
                     "grow", "before_stage", "training_examples", "loss_terms", "after_stage", "route", "route"]
    # the extra loss term trained the method's own parameter towards 1
    import json

    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert "extra_penalty" in steps[0]
    assert metrics["R"][0][1] is None  # future_tasks: none
    assert metrics["parameters"]["added"] == 1


def test_bad_target_module_is_one_line(tmp_path, tiny_config):
    from evolora.errors import ConfigError

    cfg = build_config(tiny_config(tmp_path, "seq_lora", method={"options": {"target_modules": ["qkv"]}}))
    with pytest.raises(ConfigError, match=r"method.options.target_modules: 'qkv' is not a module"):
        run(cfg)


def test_gradient_accumulation_counts_updates(tmp_path, tiny_config):
    metrics = run(build_config(tiny_config(tmp_path, train={"grad_accum": 3, "batch_size": 2})))
    for stage in metrics["stages"]:
        assert stage["train"]["updates"] == -(-stage["train"]["steps"] // 3)


def test_answer_loss_of_an_input_only_batch_is_zero_not_nan():
    import torch

    from evolora.data.prompting import IGNORE
    from evolora.models import answer_loss

    logits = torch.randn(2, 3, 11, requires_grad=True)
    loss = answer_loss(logits, torch.full((2, 2), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_addons_wrap_a_method_without_hiding_it(tmp_path, tiny_config):
    from evolora.config import build_config
    from evolora.methods import build_method

    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"addons": {"gere": {"num_texts": 2}}}))
    method = build_method(cfg.method)
    assert method.name == "moe_cl+gere"
    assert method.has_locator and method.options.locator == "gaussian"
    method.base_parameter_ids = {1, 2}
    assert method.method.base_parameter_ids == {1, 2}


def test_runs_of_another_precision_or_device_in_one_process(tmp_path, tiny_config):
    """accelerate keeps one state per process; a second run with another precision (or device) rebuilds it
    instead of refusing with accelerate's 'restart your runtime'."""
    from evolora.engine import build_context

    fp32, _ = build_context(build_config(tiny_config(tmp_path / "a")), None)
    assert fp32.accelerator.mixed_precision == "no"
    bf16, _ = build_context(build_config(tiny_config(tmp_path / "b", model={"dtype": "bf16", "device": "cpu"})), None)
    assert bf16.accelerator.mixed_precision == "bf16" and bf16.device.type == "cpu"
    again, _ = build_context(build_config(tiny_config(tmp_path / "c")), None)
    assert again.accelerator.mixed_precision == "no"
