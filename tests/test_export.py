"""`evolora export`: the exported PEFT adapter (or merged model) answers as evolora's model does."""

import json

import pytest
import torch

from evolora.config import build_config
from evolora.engine import run
from evolora.errors import EvoloraError
from evolora.export import export_run
from evolora.reload import load_run


def finished_run(tmp_path, tiny_config, method, **sections):
    raw = tiny_config(tmp_path, method, train={"lr": 1e-2, "epochs": 1, "batch_size": 4, "seed": 0}, **sections)
    run(build_config(raw), log=lambda _: None)
    return tmp_path / "run"


def logits_of(model, ctx, task_index):
    """The model's logits on a few of the task's test prompts (batch of one each, no padding)."""
    task = ctx.tasks[task_index]
    out = []
    with torch.no_grad():
        for example in task.test[:3]:
            ids = torch.tensor([ctx.prompts.encode_prompt(task, example, task_index).input_ids])
            out.append(model(input_ids=ids).logits.float())
    return out


def evolora_logits(run_dir, task_index, stage=None):
    ctx, method = load_run(run_dir, stage=stage)
    with method.route(task_index):
        return ctx, logits_of(ctx.model, ctx, task_index)


def peft_logits(folder, ctx, task_index):
    from peft import PeftModel

    from evolora.models import load_model

    base, _, _ = load_model(ctx.config.model)
    return logits_of(PeftModel.from_pretrained(base, str(folder)).eval(), ctx, task_index)


def assert_same(a, b):
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b))


def test_seq_lora_adapter_loads_in_plain_peft_and_answers_as_evolora(tmp_path, tiny_config):
    run_dir = finished_run(tmp_path, tiny_config, "seq_lora")
    record = export_run(run_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["r"] == 8
    assert record["form"] == "adapter" and record["adapters"] == ["default"]
    ctx, ours = evolora_logits(run_dir, 1)
    theirs = peft_logits(tmp_path / "adapter", ctx, 1)
    assert_same(ours, theirs)
    from evolora.models import load_model

    base, _, _ = load_model(ctx.config.model)
    assert not torch.allclose(logits_of(base, ctx, 1)[0], ours[0], atol=1e-4)  # the adapter changes the answer


def test_olora_exports_its_summed_task_adapters_as_one_adapter_of_concatenated_ranks(tmp_path, tiny_config):
    run_dir = finished_run(tmp_path, tiny_config, "olora")
    record = export_run(run_dir, tmp_path / "adapter")
    assert record["adapters"] == ["task_0", "task_1"] and record["rank"] == 16
    ctx, ours = evolora_logits(run_dir, 0)
    assert_same(ours, peft_logits(tmp_path / "adapter", ctx, 0))


def test_per_task_lora_exports_the_named_tasks_adapter(tmp_path, tiny_config):
    run_dir = finished_run(tmp_path, tiny_config, "per_task_lora")
    with pytest.raises(EvoloraError, match="--task: per_task_lora has one adapter per task"):
        export_run(run_dir, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    ctx, _ = load_run(run_dir)
    name = ctx.tasks[0].name
    export_run(run_dir, tmp_path / "adapter", task=name)
    _, ours = evolora_logits(run_dir, 0)
    assert_same(ours, peft_logits(tmp_path / "adapter", ctx, 0))
    with pytest.raises(EvoloraError, match="--task: 'nope' is not a task of this run"):
        export_run(run_dir, tmp_path / "other", task="nope")


def test_merged_export_is_a_plain_model_folder_with_the_same_answers(tmp_path, tiny_config):
    import warnings

    from transformers import AutoModelForCausalLM

    run_dir = finished_run(tmp_path, tiny_config, "seq_lora", output={"keep_checkpoints": "all"})
    with warnings.catch_warnings():  # the merge wraps the base model in peft without its upstream FutureWarning
        warnings.simplefilter("error", FutureWarning)
        export_run(run_dir, tmp_path / "merged", merge=True, stage=1)
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ctx, ours = evolora_logits(run_dir, 0, stage=0)
    assert_same(ours, logits_of(merged, ctx, 0))
    final = evolora_logits(run_dir, 0)[1]
    assert not torch.allclose(ours[0], final[0], atol=1e-5)  # --stage 1 is not the final model


def test_seq_ft_exports_the_fine_tuned_model(tmp_path, tiny_config):
    from transformers import AutoModelForCausalLM

    run_dir = finished_run(tmp_path, tiny_config, "seq_ft")
    assert export_run(run_dir, tmp_path / "model")["form"] == "model"
    ctx, ours = evolora_logits(run_dir, 1)
    assert_same(ours, logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval(), ctx, 1))


def test_expert_methods_say_why_they_cannot_be_exported_and_nothing_is_overwritten(tmp_path, tiny_config):
    run_dir = finished_run(tmp_path, tiny_config, "moe_cl", output={"keep_checkpoints": "last"})
    with pytest.raises(EvoloraError, match="moe_cl cannot be exported as a PEFT adapter.*learned gate") as err:
        export_run(run_dir, tmp_path / "adapter")
    assert "\n" not in str(err.value) and not (tmp_path / "adapter").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")] == []  # no temp folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(EvoloraError, match="exists and is not an empty folder"):
        export_run(run_dir, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(EvoloraError, match="stage 1's checkpoint was not kept"):
        export_run(run_dir, tmp_path / "x", stage=1)
