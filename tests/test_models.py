"""Device and dtype choice: bf16 only where the hardware runs it fast."""

import pytest
import torch

from evolora.config import build_config
from evolora.engine import build_context
from evolora.models import resolve_dtype, slow_dtype_warning


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_on_cpu_follows_the_cpu_bf16_support(monkeypatch, fast):
    monkeypatch.setattr("evolora.models.cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("bf16", cpu) == torch.bfloat16  # asked for explicitly: kept
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert (slow_dtype_warning(torch.bfloat16, cpu) is None) == fast
    assert slow_dtype_warning(torch.float32, cpu) is None


def test_explicit_bf16_on_a_slow_cpu_is_named_in_the_log(monkeypatch, tmp_path, tiny_config):
    monkeypatch.setattr("evolora.models.cpu_has_fast_bf16", lambda: False)
    lines = []
    build_context(build_config(tiny_config(tmp_path, model={"dtype": "bf16", "device": "cpu"})), None, log=lines.append)
    assert any(line.startswith("model.dtype: bf16 on this CPU") and "\n" not in line for line in lines)
    lines.clear()
    build_context(build_config(tiny_config(tmp_path, model={"dtype": "auto", "device": "cpu"})), None, log=lines.append)
    assert not any("model.dtype" in line for line in lines)


def test_more_processes_than_gpus_is_one_line(monkeypatch, tmp_path, tiny_config):
    from evolora.engine import check_gpus_per_node
    from evolora.errors import EvoloraError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = build_config(tiny_config(tmp_path))
    with pytest.raises(EvoloraError, match=r"^2 processes per node but 1 GPU\(s\): launch at most 1 "):
        check_gpus_per_node(config)
    check_gpus_per_node(build_config(tiny_config(tmp_path, model={"device": "cpu"})))  # CPU processes: fine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_gpus_per_node(config)
