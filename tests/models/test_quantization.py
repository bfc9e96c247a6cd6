"""model.quantization (QLoRA): GPU only, adapters only; one-line errors elsewhere, a real run on a GPU."""

import pytest
import torch

from evolora.config import build_config
from evolora.engine import run
from evolora.errors import EvoloraError


def test_quantization_is_refused_for_methods_that_train_base_weights(tmp_path, tiny_config):
    for method in ("seq_ft", "moe_cl", "cmoe"):
        raw = tiny_config(tmp_path, method, model={"quantization": "nf4"})
        with pytest.raises(EvoloraError, match=f"model.quantization: {method} trains more than adapters") as err:
            run(build_config(raw), log=lambda _: None)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_quantization_needs_a_gpu_and_a_loaded_model(tmp_path, tiny_config):
    raw = tiny_config(tmp_path, model={"quantization": "nf4"})
    with pytest.raises(EvoloraError, match="model.quantization: the tiny random model is built in memory"):
        run(build_config(raw), log=lambda _: None)
    raw = tiny_config(tmp_path, model={"name": "smollm2-135m", "quantization": "nf4", "device": "cpu"})
    with pytest.raises(EvoloraError, match=r"model.quantization: nf4 needs a CUDA GPU \(bitsandbytes\); this run is on cpu"):
        run(build_config(raw), log=lambda _: None)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA runs on a CUDA GPU only")
def test_qlora_run_on_the_embedded_model(tmp_path, tiny_config):
    pytest.importorskip("bitsandbytes")
    raw = tiny_config(tmp_path, "seq_lora", model={"name": "smollm2-135m", "quantization": "nf4", "dtype": "bf16"},
                      data={"train_per_label": 8, "test_per_label": 4})
    record = run(build_config(raw), log=lambda _: None)
    assert record["complete"] and record["metrics"]["AP"] >= 0
    from evolora.reload import load_run

    ctx, _ = load_run(tmp_path / "run")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ctx.model.modules())
