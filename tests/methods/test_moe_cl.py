"""MoE-CL on a tiny model: the reference form's defaults, freezing, gates, adversarial gradient, both mixing
modes, save/load, config errors, the evolora variant, shared snapshots and reassignment."""

import pytest
import torch
from conftest import run_crashing_in_evaluation, train_through

from evolora.config import build_config
from evolora.data.batching import collate_train
from evolora.engine import build_context, run
from evolora.errors import ConfigError
from evolora.methods.experts import MixedFFN, pool_recorded
from evolora.methods.moe_cl import GradientReversal


def moe_context(tmp_path, tiny_config, **options):
    options.setdefault("memory_per_task", 4)
    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"options": options}, data={"max_tasks": 3}))
    return build_context(cfg, tmp_path / "run")


def expert_snapshot(method, expert):
    return [p.detach().clone() for layer in range(len(method.experts.layers))
            for p in method.experts.expert_parameters(layer, expert)]


def logits_on(ctx, method, task, n=4):
    batch = collate_train(ctx.encode_train(task)[:n], ctx.tokenizer.pad_token_id).to(ctx.device)
    with torch.no_grad(), method.route(task):
        return ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits


@pytest.mark.parametrize("mixing", ["proj", "ffn"])
@pytest.mark.parametrize("gate", ["layer", "task"])
def test_old_experts_and_base_unchanged_after_a_later_task(tmp_path, tiny_config, mixing, gate):
    """Old task experts stay bit-identical; the reference's one gate per layer trains at every stage, a
    per-task gate only at its own."""
    ctx, method = moe_context(tmp_path, tiny_config, mixing=mixing, gate=gate)
    ctx.config.train.lr = 5e-2
    base = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if id(p) in method.base_parameter_ids}
    train_through(ctx, method, 1)
    task0 = expert_snapshot(method, 1)
    gate0 = [g[0].weight.detach().clone() for g in method.container.gates]
    shared = expert_snapshot(method, 0)
    assert any(p.abs().sum() > 0 for p in task0[1::2])  # B matrices moved off zero: the expert learned
    train_through(ctx, method, 2, start=1)
    assert all(torch.equal(a, b) for a, b in zip(task0, expert_snapshot(method, 1)))
    gates_kept = [torch.equal(a, g[0].weight) for a, g in zip(gate0, method.container.gates)]
    if gate == "task":
        assert all(gates_kept) and all(len(g) == 2 for g in method.container.gates)
    else:
        assert not any(gates_kept) and all(len(g) == 1 for g in method.container.gates)
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)
    assert any(not torch.equal(a, b) for a, b in zip(shared, expert_snapshot(method, 0)))  # shared keeps learning
    trainable = {id(p) for p in ctx.model.parameters() if p.requires_grad}
    assert {id(p) for p in method.experts.expert_parameters(0, 2)} <= trainable
    assert not {id(p) for p in method.experts.expert_parameters(0, 1)} & trainable


def test_defaults_are_the_reference_form(tmp_path, tiny_config):
    cfg = build_config(tiny_config(tmp_path, "moe_cl", data={"max_tasks": 3}))
    ctx, method = build_context(cfg, None)
    o = method.options
    assert (o.mixing, o.gate, o.gate_input, o.adversarial_weight, o.discriminator_hidden, o.discriminator_classes,
            o.memory_per_task, o.dropout, o.shared_snapshots, o.reassign_examples) == \
        ("ffn", "layer", "ffn", 1.0, 0, "all", 0, 0.05, False, 0)
    method.grow(0, ctx)
    gate = method.container.gates[0][0]
    assert gate.bias is None and gate.out_features == 2 and 0.005 < gate.weight.std().item() < 0.05  # N(0, 0.02)
    disc = method.container.discriminators["0"]
    assert len(disc) == 1 and disc[0].bias is None and disc[0].out_features == len(ctx.tasks)
    assert sorted(int(k) for k in method.container.discriminators) == list(range(len(method.experts.layers)))


def test_the_gate_reads_the_ffn_input(tmp_path, tiny_config):
    """gate_input: ffn hands the gate what the FFN receives (the post-attention norm's output)."""
    ctx, method = moe_context(tmp_path, tiny_config, memory_per_task=0)
    method.grow(0, ctx)
    layer = method.experts.layers[0]
    seen = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, out: seen.setdefault("norm", out))
    real = method.experts.weights_fn
    method.experts.weights_fn = lambda index, x: (seen.setdefault(index, x), real(index, x))[1]
    batch = collate_train(ctx.encode_train(0)[:2], ctx.tokenizer.pad_token_id).to(ctx.device)
    with torch.no_grad(), method.route(0):
        ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    assert torch.equal(seen[0], seen["norm"])


def test_the_evolora_variant_is_one_named_bundle_that_options_override(tmp_path, tiny_config):
    from evolora.methods.moe_cl import EVOLORA_VARIANT

    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"options": {"variant": "evolora", "r": 4}}))
    _, method = build_context(cfg, None)
    assert all(getattr(method.options, k) == v for k, v in EVOLORA_VARIANT.items())
    assert method.options.r == 4
    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"options": {"variant": "evolora", "mixing": "ffn"}}))
    assert build_context(cfg, None)[1].options.mixing == "ffn"


def test_gate_weights_sum_to_one_and_pick_the_task_expert(tmp_path, tiny_config):
    ctx, method = moe_context(tmp_path, tiny_config, gate="task")
    for stage in range(3):
        method.grow(stage, ctx)
    for gates in method.container.gates:
        for gate in gates:
            torch.nn.init.normal_(gate.weight)
    x = torch.randn(2, 5, method.experts.hidden_size, device=ctx.device)
    with method.route(1):
        experts, w, common = method._weights(0, x)
    assert experts.tolist() == [[0, 2], [0, 2]] and common == (0, 2)  # the shared expert and task 1's
    assert w.shape == (2, 5, 2) and (w > 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(2, 5, device=ctx.device))
    with method.batch_route(torch.tensor([1, 1])):  # a batch of one task routes as that task does
        assert torch.allclose(method._weights(0, x).weights, w) and method._weights(0, x).common == (0, 2)
    with method.batch_route(torch.tensor([0, 2])):  # per-sample routing of a mixed batch
        experts, mixed, common = method._weights(0, x)
    assert experts.tolist() == [[0, 1], [0, 3]] and common is None
    for sample, task in enumerate([0, 2]):  # each sample is weighted by its own task's gate
        with method.route(task):
            assert torch.allclose(mixed[sample], method._weights(0, x).weights[sample], atol=1e-6)
    with method.route(None):  # no task known: the shared expert alone
        experts, w, common = method._weights(0, x)
    assert experts.tolist() == [[0], [0]] and torch.equal(w, torch.ones(2, 5, 1, device=ctx.device))


def test_one_gate_per_layer_weighs_every_task_alike(tmp_path, tiny_config):
    ctx, method = moe_context(tmp_path, tiny_config)
    for stage in range(3):
        method.grow(stage, ctx)
    x = torch.randn(2, 5, method.experts.hidden_size, device=ctx.device)
    with method.route(2):
        experts, w, _ = method._weights(0, x)
    assert experts.tolist() == [[0, 3], [0, 3]]
    with method.batch_route(torch.tensor([0, 2])):
        experts, mixed, _ = method._weights(0, x)
    assert experts.tolist() == [[0, 1], [0, 3]] and torch.allclose(mixed, w, atol=1e-6)


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))


@pytest.mark.parametrize("mixing", ["proj", "ffn"])
def test_adversarial_gradient_reaches_shared_expert_opposite_to_the_discriminator(tmp_path, tiny_config, mixing):
    from evolora.methods.base import StepInputs

    ctx, method = moe_context(tmp_path, tiny_config, mixing=mixing, adversarial_weight=1.0, dropout=0.0,
                              discriminator_hidden=8)
    for stage in range(2):
        method.grow(stage, ctx)
    for layer in range(len(method.experts.layers)):  # a non-zero shared expert, so its output carries signal
        for p in method.experts.expert_parameters(layer, 0):
            torch.nn.init.normal_(p, std=0.1)
    examples = method.training_examples(1, ctx.encode_train(1), ctx)
    batch = collate_train(examples[:4] + examples[-4:], ctx.tokenizer.pad_token_id).to(ctx.device)  # tasks 1, 0 (memory)
    assert set(batch.task_ids.tolist()) == {0, 1}
    ctx.model.train()

    def grads():
        ctx.model.zero_grad()
        with method.batch_route(batch.task_ids):
            out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids)
        term = method.loss_terms(StepInputs(batch, out, torch.tensor(0.0, device=ctx.device), 1, ctx.model),
                                 ctx)["adversarial"]
        term.backward()
        shared = method.experts.expert_parameters(len(method.experts.layers) - 1, 0)[-1].grad.clone()
        disc = next(iter(method.container.discriminators.values()))[0].weight.grad.clone()
        return shared, disc

    shared_reversed, disc_reversed = grads()
    # the batched pass over layers is the mean of each layer's discriminator cross-entropy
    with torch.no_grad(), method.batch_route(batch.task_ids):
        out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        term = method.loss_terms(StepInputs(batch, out, torch.tensor(0.0), 1, ctx.model), ctx)["adversarial"]
        mask = batch.attention_mask.float()
        per_layer = [torch.nn.functional.cross_entropy(
            method.container.discriminators[str(layer)](
                pool_recorded([method.experts.routing[layer].recorded], mask / mask.sum(1, keepdim=True))[0]),
            batch.task_ids) for layer in method.disc_layers]
    assert len(per_layer) > 1 and torch.allclose(term, torch.stack(per_layer).mean(), atol=1e-5)
    method.options.adversarial_weight = -1.0  # same term without the reversal: a plain classifier loss
    shared_plain, disc_plain = grads()
    assert shared_reversed.abs().sum() > 0
    assert torch.allclose(shared_reversed, -shared_plain, atol=1e-6)
    assert torch.allclose(disc_reversed, disc_plain, atol=1e-6)  # the discriminator itself is not reversed


@pytest.mark.parametrize("mixing, gate", [("ffn", "layer"), ("proj", "layer"), ("proj", "task"), ("ffn", "task")])
def test_no_adversarial_gradient_reaches_a_gate(tmp_path, tiny_config, mixing, gate):
    """The discriminator reads the shared expert's ungated output: its reversed gradient reaches the shared
    expert and never a gate (with the discriminator on the first layer, nothing upstream holds a gate)."""
    from evolora.methods.base import StepInputs

    ctx, method = moe_context(tmp_path, tiny_config, mixing=mixing, gate=gate, discriminator_layers=[0],
                              memory_per_task=2)
    for stage in range(2):
        method.grow(stage, ctx)
    for layer in range(len(method.experts.layers)):
        for p in method.experts.expert_parameters(layer, 0):
            torch.nn.init.normal_(p, std=0.1)
    for gates in method.container.gates:
        for g in gates:
            g.requires_grad_(True)
    examples = method.training_examples(1, ctx.encode_train(1), ctx)
    batch = collate_train(examples[:3] + examples[-2:], ctx.tokenizer.pad_token_id).to(ctx.device)
    ctx.model.train()
    ctx.model.zero_grad()
    with method.batch_route(batch.task_ids):
        out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    method.loss_terms(StepInputs(batch, out, torch.tensor(0.0), 1, ctx.model), ctx)["adversarial"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.experts.expert_parameters(0, 0))
    gate_grads = [g.weight.grad for gates in method.container.gates for g in gates]
    assert all(grad is None or grad.abs().sum() == 0 for grad in gate_grads)


def test_ffn_and_proj_mixing_differ_once_experts_are_trained(tmp_path, tiny_config):
    outs = {}
    for mixing in ("proj", "ffn"):
        ctx, method = moe_context(tmp_path / mixing, tiny_config, mixing=mixing)
        torch.manual_seed(0)
        method.grow(0, ctx)
        for layer in range(len(method.experts.layers)):
            for expert in (0, 1):
                for p in method.experts.expert_parameters(layer, expert):
                    torch.nn.init.normal_(p, std=0.2)
        ctx.model.eval()
        outs[mixing] = logits_on(ctx, method, 0)
    assert not torch.allclose(outs["proj"], outs["ffn"], atol=1e-4)


@pytest.mark.parametrize("snapshots", [False, True])
def test_save_load_gives_identical_outputs(tmp_path, tiny_config, snapshots):
    import json

    from evolora.reload import evaluate_run, load_run

    raw = tiny_config(tmp_path, "moe_cl", method={"options": {"memory_per_task": 2, "shared_snapshots": snapshots}},
                      data={"max_tasks": 2},
                      train={"lr": 5e-2})
    record = run(build_config(raw))
    if snapshots:  # task 0 answers at the end as it did after its own stage
        assert record["R"][-1][0] == record["R"][0][0]
    ctx, method = load_run(tmp_path / "run")
    ctx2, method2 = load_run(tmp_path / "run")
    for task in range(2):
        assert torch.equal(logits_on(ctx, method, task), logits_on(ctx2, method2, task))
    fresh, fresh_method = build_context(build_config(raw), None)
    for stage in range(2):
        fresh_method.grow(stage, fresh)
    fresh.model.eval()
    assert not torch.equal(logits_on(ctx, method, 1), logits_on(fresh, fresh_method, 1))
    reloaded = evaluate_run(tmp_path / "run")
    assert list(reloaded["accuracy"].values()) == record["R"][-1]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["R"][-1] == record["R"][-1]


@pytest.mark.parametrize("options, message", [
    ({"target_modules": ["nope_proj"]}, "target_modules: 'nope_proj' is not a module"),
    ({"r": 0}, "method.options: r must be > 0"),
    ({"mixing": "sum"}, "method.options.mixing"),
    ({"discriminator_layers": [99]}, "discriminator_layers: layer 99 does not exist"),
    ({"reassign_margin": 1.5}, "method.options: reassign_margin: must be in"),
    ({"reassign_examples": -1}, "method.options: reassign_examples: must be >= 0"),
    ({"adversarial_weight": -0.5}, "method.options: adversarial_weight: must be >= 0"),
    ({"reassign_by": "f1"}, "method.options.reassign_by"),
    ({"gate": "two"}, "method.options.gate"),
    ({"variant": "mine"}, "method.options.variant: unknown variant 'mine' for moe_cl"),
    ({"target_modules": ["q_proj", "down_proj"]}, "target_modules: 'q_proj' is outside the FFN"),
    ({"warm_start_examples": 4}, "method.options.warm_start_examples: unknown option"),
])
def test_bad_config_is_one_line(tmp_path, tiny_config, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"options": options}))
        build_context(cfg, None)
    assert "\n" not in str(err.value)


def test_replay_addon_routes_stored_examples_through_their_own_task(tmp_path, tiny_config):
    """`moe_cl+replay`: a stored example of task 0 trains the shared expert through task 0's routing,
    not the current task's expert (which it never passes through), and task 0's frozen expert not at all."""
    from evolora.models import answer_loss

    raw = tiny_config(tmp_path, "moe_cl", method={"options": {"memory_per_task": 0},
                                                  "addons": {"replay": {"per_task": 3}}}, data={"max_tasks": 2})
    ctx, method = build_context(build_config(raw), tmp_path / "run")
    assert method.name == "moe_cl+replay"
    moe = method.method  # the wrapped MoE-CL: its experts
    method.grow(0, ctx)
    method.grow(1, ctx)
    method.before_stage(1, ctx)
    examples = method.training_examples(1, ctx.encode_train(1), ctx)
    stored = [e for e in examples if e.task_index == 0]
    assert len(stored) == 3 and len(examples) == len(ctx.tasks[1].train) + 3
    for layer in range(len(moe.experts.layers)):
        for expert in range(3):
            for p in moe.experts.expert_parameters(layer, expert):
                torch.nn.init.normal_(p, std=0.1)
    batch = collate_train(stored, ctx.tokenizer.pad_token_id).to(ctx.device)
    assert (batch.labels != -100).any()  # stored with their answers: they carry the LM loss
    ctx.model.train()
    ctx.model.zero_grad()
    with method.batch_route(batch.task_ids):
        out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, logits_to_keep=batch.labels.shape[1] + 1)
    answer_loss(out.logits, batch.labels).backward()
    last = len(moe.experts.layers) - 1
    shared, old, current = (moe.experts.expert_parameters(last, e) for e in range(3))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert all(not p.requires_grad for p in old)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in current)
    bad = tiny_config(tmp_path, "moe_cl", method={"addons": {"replay": {"per_task": -1}}})
    with pytest.raises(ConfigError, match=r"method.addons.replay: per_task must be >= 0"):
        build_context(build_config(bad), None)


def test_reassignment_moves_a_task_only_for_a_clearly_lower_loss(tmp_path, tiny_config, monkeypatch):
    """After each stage, an old task compares its answerer with the new expert, the new task every expert;
    a move needs a loss lower by more than the margin."""
    ctx, method = moe_context(tmp_path, tiny_config, reassign_examples=2, reassign_margin=0.1)
    ctx.config.eval.cache = False  # nothing trains here: every score would be kept (tested below)
    table = {1: {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 0.95, (1, 1): 1.0},
             2: {(0, 1): 0.5, (0, 2): 0.3, (1, 1): 1.0, (1, 2): 0.95, (2, 0): 0.2, (2, 1): 0.6, (2, 2): 0.25}}
    asked = []

    def fake_loss(examples, answer, ctx_):
        task, (expert, shared) = examples[0].task_index, answer
        assert expert == shared  # no snapshots: an expert always comes with the live shared expert
        asked.append((task, expert))
        return table[stage][(task, expert)]

    monkeypatch.setattr(method, "_answer_loss", fake_loss)
    for stage in (1, 2):
        method.grow(stage, ctx)
        method.reassign(stage, ctx)
        if stage == 1:
            assert method.answerer[:2, 0].tolist() == [1, 1]  # 0.5 < 0.9 * 1.0 moves; 0.95 vs 1.0 does not
    # stage 2: task 0 compares its answerer (1) with the new expert 2; task 2 compares all three
    assert sorted(asked[4:]) == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert method.answerer[:, 0].tolist() == [2, 1, 0]
    assert method.answerers() == {t.name: ctx.tasks[e].name for t, e in zip(ctx.tasks, [2, 1, 0])}


def test_reassignment_by_accuracy_compares_error_rates_scored_as_evaluation_scores(tmp_path, tiny_config,
                                                                                    monkeypatch):
    """`reassign_by: accuracy`: a task's kept examples are scored as its test examples are (so a task's error
    rate there is what evaluation would report on them), and the margin applies to error rates."""
    from evolora.engine import evaluate_row

    ctx, method = moe_context(tmp_path, tiny_config, reassign_examples=6, reassign_by="accuracy")
    ctx.config.train.lr = 5e-2
    train_through(ctx, method, 2)
    examples = method._labelled_memory(0, ctx)
    for answer in [(0, 0), (1, 1)]:
        error = method._answer_error(0, examples, answer, ctx)
        monkeypatch.setattr(ctx.tasks[0], "test", examples)
        monkeypatch.setattr(method, "answerer", torch.tensor([answer, (1, 1), (2, 2)]))
        row, _ = evaluate_row(ctx, method, [0])
        assert row[0] == pytest.approx(100.0 * (1.0 - error))
    kept = {t.name: len(method._labelled_memory(j, ctx)) for j, t in enumerate(ctx.tasks)}
    assert all(v * kept[task] == pytest.approx(round(v * kept[task]), abs=1e-3)  # error rates of kept examples
               for task, scores in method.reassign_scores.items() for v in scores.values())

    errors = {(0, 0): 0.5, (1, 1): 0.46, (2, 2): 0.4}  # 0.46 is not 10 % under 0.5; 0.4 is
    monkeypatch.setattr(method, "_answer_error", lambda task, examples_, answer, ctx_: errors[answer])
    monkeypatch.setattr(method, "_answer_loss", lambda *args: pytest.fail("reassign_by=accuracy read a loss"))
    method.answerer = torch.arange(3).repeat(2, 1).T.contiguous()
    method.reassign(1, ctx)
    assert method.answerer[0].tolist() == [0, 0]
    method.grow(2, ctx)
    method.reassign(2, ctx)
    assert method.answerer[0].tolist() == [2, 2]


def test_reassignment_reads_the_dev_split_when_the_stream_has_one(tmp_path, tiny_config):
    """A task's own expert has trained on its train examples; held-out dev examples judge experts fairly."""
    def encoded(ctx, task, examples):
        return {tuple(ctx.prompts.encode_train(ctx.tasks[task], ex, task).input_ids) for ex in examples}

    def chosen_inputs(ctx, method, task):
        return encoded(ctx, task, method._labelled_memory(task, ctx))

    ctx, method = moe_context(tmp_path / "a", tiny_config, reassign_examples=3)
    assert not ctx.tasks[1].dev and chosen_inputs(ctx, method, 1) <= encoded(ctx, 1, ctx.tasks[1].train)
    cfg = build_config(tiny_config(tmp_path, "moe_cl", method={"options": {"reassign_examples": 3}},
                                   data={"max_tasks": 3, "dev_per_label": 2}))
    ctx, method = build_context(cfg, tmp_path / "b")
    dev = encoded(ctx, 1, ctx.tasks[1].dev)
    assert len(chosen_inputs(ctx, method, 1)) == 3 and chosen_inputs(ctx, method, 1) <= dev
    assert not dev & encoded(ctx, 1, ctx.tasks[1].train)


def test_a_reassigned_task_is_answered_by_its_answerers_expert_and_gate_after_reload(tmp_path, tiny_config):
    from evolora.reload import load_run

    raw = tiny_config(tmp_path, "moe_cl", method={"options": {"memory_per_task": 2, "reassign_examples": 3}},
                      data={"max_tasks": 2}, train={"lr": 5e-2})
    record = run(build_config(raw))
    answered = record["method_metrics"]["answerer"]
    assert record["method_metrics"]["reassign_by"] == "loss"  # says what the scores are
    assert list(answered) == record["stream"]["tasks"]
    ctx, method = load_run(tmp_path / "run")
    assert method.answerers() == answered  # the map travels in the checkpoint
    _, again = load_run(tmp_path / "run", ["method.options.reassign_examples=2"])
    assert {t: set(scores) for t, scores in again.reassign_scores.items()} == \
        {t: set(record["stream"]["tasks"]) for t in record["stream"]["tasks"]}  # every expert for every task
    method.answerer[0] = torch.tensor([1, 1])
    with torch.no_grad(), method._use_expert(1):
        batch = collate_train(ctx.encode_train(0)[:4], ctx.tokenizer.pad_token_id).to(ctx.device)
        by_expert_1 = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).logits
    assert torch.equal(logits_on(ctx, method, 0), by_expert_1)
    method.answerer[0] = torch.tensor([0, 0])
    assert not torch.equal(logits_on(ctx, method, 0), by_expert_1)


@pytest.mark.parametrize("mixing", ["proj", "ffn"])
def test_shared_snapshots_keep_an_old_tasks_outputs_exactly(tmp_path, tiny_config, mixing):
    """With shared snapshots, task 0 answers after task 1 exactly as it did after its own stage (the paper's
    form changes, through the live shared expert); the current task reads the live shared expert."""
    outputs = {}
    for snapshots in (False, True):
        ctx, method = moe_context(tmp_path / str(snapshots), tiny_config, mixing=mixing, shared_snapshots=snapshots,
                                  gate="task")
        ctx.config.train.lr = 5e-2
        train_through(ctx, method, 1)
        ctx.model.eval()
        before = logits_on(ctx, method, 0)
        train_through(ctx, method, 2, start=1)
        ctx.model.eval()
        outputs[snapshots] = (before, logits_on(ctx, method, 0))
        if snapshots:
            assert method.experts.num_experts(0) == 5  # shared, then (expert, snapshot) per task
            live = expert_snapshot(method, 0)
            assert any(not torch.equal(a, b) for a, b in zip(live, expert_snapshot(method, 2)))  # 0's copy stays
            assert all(torch.equal(a, b) for a, b in zip(live, expert_snapshot(method, 4)))  # 1's copy is fresh
            trainable = {id(p) for p in ctx.model.parameters() if p.requires_grad}
            assert {id(p) for p in method.experts.expert_parameters(0, 3)} <= trainable
            assert not {id(p) for p in method.experts.expert_parameters(0, 2)} & trainable
    assert not torch.equal(*outputs[False])
    assert torch.equal(*outputs[True])
    assert torch.equal(outputs[False][0], outputs[True][0])  # snapshots change no training: same first stage


def test_with_snapshots_an_old_task_can_take_the_newest_shared_expert(tmp_path, tiny_config, monkeypatch):
    ctx, method = moe_context(tmp_path, tiny_config, shared_snapshots=True, reassign_examples=2)
    method.grow(0, ctx)
    for layer in range(len(method.experts.layers)):
        for p in method.experts.expert_parameters(layer, 0) + method.experts.expert_parameters(layer, 1):
            torch.nn.init.normal_(p, std=0.1)
        method.experts.copy_expert(layer, 0, 2)  # task 0's snapshot, as after_stage takes it
    method.grow(1, ctx)
    for layer in range(len(method.experts.layers)):
        for p in method.experts.expert_parameters(layer, 0):
            torch.nn.init.normal_(p, std=0.1)  # the shared expert trained on task 1
    losses = {(0, (0, 0)): 1.0, (0, (0, 1)): 0.5, (0, (1, 1)): 0.8, (1, (0, 0)): 1.0, (1, (1, 1)): 1.0}
    monkeypatch.setattr(method, "_answer_loss", lambda ex, answer, c: losses[(ex[0].task_index, answer)])
    method.reassign(1, ctx)
    assert method.answerer.tolist()[:2] == [[0, 1], [1, 1]]
    assert method.answerers()[ctx.tasks[0].name] == f"{ctx.tasks[0].name} with {ctx.tasks[1].name}'s shared"
    ctx.model.eval()
    with torch.no_grad():
        batch = collate_train(ctx.encode_train(0)[:4], ctx.tokenizer.pad_token_id).to(ctx.device)

        def logits(context):
            with context:
                return ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids).logits
        routed = logits(method.route(0))
        assert torch.equal(routed, logits(method._use_expert(0, 1)))  # its expert, the live shared expert
        assert not torch.equal(routed, logits(method._use_expert(0, 0)))  # not its snapshot


@pytest.mark.parametrize("reassign_by", ["loss", "accuracy"])
def test_kept_reassignment_scores_give_the_same_scores_and_choices(tmp_path, tiny_config, reassign_by):
    """With eval.cache a candidate whose answering tensors (frozen expert and gate, frozen shared snapshot) and
    the reassignment settings are unchanged keeps its score from an earlier stage: every stage's scores and
    answerers are those of a run that scores every candidate again, and fewer are scored."""
    def stages(name, cache):
        raw = tiny_config(tmp_path / name, "moe_cl",
                          method={"options": {"memory_per_task": 2, "shared_snapshots": True, "gate": "task",
                                              "mixing": "proj", "reassign_examples": 6, "reassign_by": reassign_by}},
                          data={"max_tasks": 3, "train_per_label": 4, "dev_per_label": 3},
                          train={"lr": 5e-2}, eval={"cache": cache})
        return [s["train"]["method"] for s in run(build_config(raw))["stages"]]

    kept, again = stages("kept", True), stages("again", False)
    assert [s["reassign_scores"] for s in kept] == [s["reassign_scores"] for s in again]
    assert [s["answerer"] for s in kept] == [s["answerer"] for s in again]
    assert [s["reassign_reused"] for s in again] == [0, 0, 0]
    # each old task's answerer, frozen since the stage before, is not scored again (1 old task, then 2)
    assert [s["reassign_reused"] for s in kept][:2] == [0, 1] and kept[2]["reassign_reused"] >= 2
    changed = {"gate": "layer"}  # one gate for every task, trained at every stage: nothing can be kept
    raw = tiny_config(tmp_path / "layer", "moe_cl", data={"max_tasks": 3, "train_per_label": 4, "dev_per_label": 3},
                      method={"options": {"memory_per_task": 2, "shared_snapshots": True, "reassign_examples": 4,
                                          **changed}})
    assert [s["train"]["method"]["reassign_reused"] for s in run(build_config(raw))["stages"]] == [0, 0, 0]


@pytest.mark.parametrize("damage", [None, "foreign", "corrupt"])
def test_a_resumed_run_keeps_its_reassignment_scores(tmp_path, tiny_config, monkeypatch, damage):
    """The kept scores are written to the run folder with each stage's checkpoint: a run that crashed and
    resumed reuses them at its next reassignment as the uninterrupted run did, with the same scores and choices.
    A file made under other settings, or unreadable, is ignored (every candidate is scored again)."""
    import json

    import evolora.engine.runner as engine

    def raw(name):
        return tiny_config(tmp_path / name, "moe_cl",
                           method={"options": {"memory_per_task": 2, "shared_snapshots": True, "gate": "task",
                                               "mixing": "proj", "reassign_examples": 6}},
                           data={"max_tasks": 3, "train_per_label": 4, "dev_per_label": 3}, train={"lr": 5e-2})

    whole = [s["train"]["method"] for s in run(build_config(raw("whole")))["stages"]]
    run_crashing_in_evaluation(build_config(raw("crashed")), monkeypatch, stage=2)  # stage 2 trained and reassigned
    kept = tmp_path / "crashed" / "run" / "state" / "method-scores.json"
    stored = json.loads(kept.read_text())
    assert len(stored["kept"]["reassign"]) >= 4  # the candidates of both tasks at stages 1 and 2
    if damage == "foreign":
        kept.write_text(json.dumps({**stored, "scope": "0" * 64}))
    elif damage == "corrupt":
        kept.write_text(json.dumps({**stored, "kept": {"reassign": {"0:0:0": ["key"]}}}))
    logs = []
    resumed = [s["train"]["method"] for s in engine.run(build_config(raw("crashed")), resume=True,
                                                           log=logs.append)["stages"]]
    assert [s["reassign_scores"] for s in resumed] == [s["reassign_scores"] for s in whole]
    assert [s["answerer"] for s in resumed] == [s["answerer"] for s in whole]
    assert any("the method's kept scores restored" in line for line in logs) == (damage is None)
    if damage is None:
        assert resumed[2]["reassign_reused"] == whole[2]["reassign_reused"] >= 2
    else:
        assert resumed[2]["reassign_reused"] == 0


def test_reassignment_leaves_training_unchanged(tmp_path, tiny_config):
    """Reassignment only evaluates: with it on (by loss or by accuracy, any number of examples) every training
    step's loss is what it is with it off."""
    import json

    def step_losses(name, **options):
        raw = tiny_config(tmp_path / name, "moe_cl",
                          method={"options": {"memory_per_task": 4, "shared_snapshots": True, **options}},
                          data={"max_tasks": 3, "train_per_label": 8, "dev_per_label": 4},
                          train={"log_every": 1, "lr": 5e-2})
        record = run(build_config(raw))
        steps = [json.loads(line) for line in (tmp_path / name / "run" / "steps.jsonl").read_text().splitlines()]
        return [(s["stage"], s["step"], s["loss"]) for s in steps], record["stages"]

    off, _ = step_losses("off")
    assert len({stage for stage, _, _ in off}) == 3
    for name, options in [("loss", {"reassign_examples": 4}),
                          ("accuracy", {"reassign_examples": 8, "reassign_by": "accuracy"})]:
        losses, stages = step_losses(name, **options)
        assert stages[-1]["train"]["method"]["reassign_scores"]  # reassignment ran
        assert losses == off


def test_the_reference_double_softmax_is_an_option_and_bounds_the_term(tmp_path, tiny_config):
    """CE of softmax probabilities stays within log(K) ± 1 whatever the discriminator says; CE of logits does not."""
    import math

    from evolora.methods.base import StepInputs

    worst = {}
    for loss in ("logits", "probs"):
        ctx, method = moe_context(tmp_path / loss, tiny_config, discriminator_loss=loss, memory_per_task=0)
        method.grow(0, ctx)
        method.grow(1, ctx)
        for d in method.container.discriminators.values():
            torch.nn.init.normal_(d[0].weight, std=50.0)  # a confident discriminator
        for layer in range(len(method.experts.layers)):
            for p in method.experts.expert_parameters(layer, 0):
                torch.nn.init.normal_(p, std=0.5)
        batch = collate_train(ctx.encode_train(1)[:4], ctx.tokenizer.pad_token_id).to(ctx.device)
        ctx.model.train()
        values = []
        for label in range(len(ctx.tasks)):  # the label it is most confidently wrong about gives the largest CE
            with torch.no_grad(), method.batch_route(torch.ones_like(batch.task_ids)):
                out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids)
                batch.task_ids[:] = label
                values.append(method.loss_terms(StepInputs(batch, out, torch.tensor(0.0), 1, ctx.model),
                                                ctx)["adversarial"].item())
        worst[loss] = max(values)
    assert worst["probs"] <= math.log(len(ctx.tasks)) + 1.0 < worst["logits"]


@pytest.mark.parametrize("mixed_tasks", [False, True])
def test_the_fused_ffn_mix_equals_two_ffn_passes(tmp_path, tiny_config, mixed_tasks):
    """The fused FFN (base projections once, the down projection on the gate-mixed inner activations) gives the
    two-pass mix's logits, gradients and discriminator features, for one task per batch and for mixed tasks."""
    from evolora.methods.base import StepInputs

    ctx, method = moe_context(tmp_path, tiny_config, dropout=0.0, memory_per_task=2)
    for stage in range(2):
        method.grow(stage, ctx)
    torch.manual_seed(0)
    for layer in range(len(method.experts.layers)):
        for expert in range(method.experts.num_experts(layer)):
            for p in method.experts.expert_parameters(layer, expert):
                torch.nn.init.normal_(p, std=0.1)
    ffns = [m for m in ctx.model.modules() if isinstance(m, MixedFFN)]
    assert ffns and all(m.fused for m in ffns)
    examples = method.training_examples(1, ctx.encode_train(1), ctx)
    chosen = examples[:3] + examples[-2:] if mixed_tasks else examples[:4]
    batch = collate_train(chosen, ctx.tokenizer.pad_token_id).to(ctx.device)
    assert len(set(batch.task_ids.tolist())) == (2 if mixed_tasks else 1)
    ctx.model.train()
    trained = [p for p in ctx.model.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        for m in ffns:
            m.fused = fused
        ctx.model.zero_grad()
        with method.batch_route(batch.task_ids):
            out = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids)
        mask = batch.attention_mask.float()
        features = pool_recorded([r.recorded for r in method.experts.routing], mask / mask.sum(1, keepdim=True))
        term = method.loss_terms(StepInputs(batch, out, torch.tensor(0.0), 1, ctx.model), ctx)["adversarial"]
        (out.logits.float().pow(2).mean() + term).backward()
        results.append((out.logits.detach(), features.detach(), [p.grad.clone() for p in trained]))
    (fused_logits, fused_features, fused_grads), (plain_logits, plain_features, plain_grads) = results
    assert torch.allclose(fused_logits, plain_logits, atol=1e-5)
    assert torch.allclose(fused_features, plain_features, atol=1e-5)
    assert len(fused_grads) > 4 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused_grads, plain_grads))
    assert any(g.abs().sum() > 0 for g in fused_grads)
