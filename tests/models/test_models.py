"""Device and dtype choice: bf16 only where the hardware runs it fast; bf16 products in fp32 where it does not."""

import pytest
import torch

from evolora.config import build_config
from evolora.engine import build_context
from evolora.models import Bf16ProductsInFp32, bf16_emulation_note, resolve_dtype


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_on_cpu_follows_the_cpu_bf16_support(monkeypatch, fast):
    monkeypatch.setattr("evolora.models.cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("bf16", cpu) == torch.bfloat16  # asked for explicitly: kept
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert (bf16_emulation_note(torch.bfloat16, cpu) is None) == fast
    assert bf16_emulation_note(torch.float32, cpu) is None


def test_bf16_products_in_fp32_are_named_in_the_log(monkeypatch, tmp_path, tiny_config):
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


def _products(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(24, 40, generator=g), torch.randn(40, 32, generator=g)
    bias = torch.randn(32, generator=g)
    a3, b3 = torch.randn(3, 24, 40, generator=g), torch.randn(3, 40, 32, generator=g)
    c3 = torch.randn(3, 24, 32, generator=g)
    return [(torch.mm, (a, b)), (torch.addmm, (bias, a, b)), (torch.bmm, (a3, b3)), (torch.baddbmm, (c3, a3, b3))]


@pytest.mark.parametrize("index", range(4))
def test_bf16_products_in_fp32_are_what_a_bf16_kernel_returns(index):
    op, args = _products()[index]
    halves = [t.bfloat16() for t in args]
    with Bf16ProductsInFp32():
        emulated = op(*halves)
        fp32 = op(*args)
    assert emulated.dtype == torch.bfloat16
    assert torch.equal(emulated, op(*[t.float() for t in halves]).bfloat16())  # fp32 product of the bf16 inputs, rounded
    assert (emulated == op(*halves)).float().mean() > 0.98  # the native bf16 kernel: same up to summation order
    assert torch.equal(fp32, op(*args))  # fp32 products pass through


def test_bf16_products_in_fp32_reach_the_backward_pass():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 40, generator=g).bfloat16().requires_grad_()
    w = torch.randn(24, 40, generator=g).bfloat16().requires_grad_()
    calls = []

    class Counting(Bf16ProductsInFp32):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in self.PRODUCTS:
                calls.append(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Counting():
        torch.nn.functional.linear(x, w).square().sum().backward()
    assert len(calls) == 3  # the forward product and the two of the backward
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_a_bf16_run_uses_fp32_products_only_on_a_slow_cpu(monkeypatch, tmp_path, tiny_config, fast):
    from evolora.engine import run
    from evolora.reload import evaluate_run

    monkeypatch.setattr("evolora.models.cpu_has_fast_bf16", lambda: fast)
    calls = []
    original = Bf16ProductsInFp32.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Bf16ProductsInFp32, "__torch_dispatch__", counting)
    config = build_config(tiny_config(tmp_path, model={"dtype": "bf16", "device": "cpu"},
                                      data={"train_per_label": 2, "test_per_label": 2}))
    metrics = run(config, tmp_path / "run", log=lambda _: None)
    assert metrics["complete"]
    assert bool(calls) != fast
    calls.clear()
    evaluate_run(tmp_path / "run")
    assert bool(calls) != fast
