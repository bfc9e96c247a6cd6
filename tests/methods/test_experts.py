"""ExpertLinear: a Route (k experts per sample) gives the same output, recorded shared delta and gradients as
dense weights over all experts that are zero outside those k, and a Route whose experts are common to all
samples the same as one that names them per sample."""

import torch
from torch import nn

from evolora.methods.experts import ExpertLinear, LayerRouting, Route


def expert_linear(n_experts: int) -> ExpertLinear:
    torch.manual_seed(0)
    linear = ExpertLinear(nn.Linear(12, 10), "up_proj", LayerRouting(0), r=4, alpha=8)
    for _ in range(n_experts):
        linear.add_expert()
    for b in linear.lora_B:
        nn.init.normal_(b)  # non-zero, so every expert changes the output
    return linear


def run(linear, x, route):
    linear.zero_grad()
    linear.routing.set(route)
    linear.routing.record = "up_proj"
    out = linear(x)
    out.square().sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in linear.parameters()]
    return out.detach(), linear.routing.recorded.detach(), grads


def test_route_matches_dense_weights_in_output_recorded_shared_delta_and_gradients():
    linear = expert_linear(6)
    x = torch.randn(3, 5, 12)
    experts = torch.tensor([[0, 2], [0, 5], [0, 2]])
    weights = torch.softmax(torch.randn(3, 5, 2), -1)
    dense = torch.zeros(3, 5, 6).scatter(-1, experts.unsqueeze(1).expand(3, 5, 2), weights)
    sparse_out, sparse_recorded, sparse_grads = run(linear, x, Route(experts, weights))
    dense_out, dense_recorded, dense_grads = run(linear, x, dense)
    assert torch.allclose(sparse_out, dense_out, atol=1e-5)
    assert torch.allclose(sparse_recorded, dense_recorded, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(sparse_grads, dense_grads))
    assert sparse_grads[2 + 2].abs().sum() > 0  # A of expert 2 (after the base weight and bias) learns
    assert sparse_grads[2 + 1].abs().sum() == 0  # expert 1 is used by no sample: no gradient


def test_route_with_one_expert_and_no_routing():
    linear = expert_linear(3)
    x = torch.randn(2, 4, 12)
    linear.routing.set(Route(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 4, 1)))
    shared_only = linear(x)
    linear.routing.set(torch.tensor([1.0, 0.0, 0.0]).expand(2, 4, 3))
    assert torch.allclose(shared_only, linear(x), atol=1e-5)
    linear.routing.set(None)
    assert torch.equal(linear(x), linear.base(x))


def test_common_experts_match_per_sample_experts():
    linear = expert_linear(5)
    x = torch.randn(3, 5, 12)
    experts = torch.tensor([[0, 3]]).expand(3, 2)
    weights = torch.softmax(torch.randn(3, 5, 2), -1)
    per_sample = run(linear, x, Route(experts, weights))
    common = run(linear, x, Route(experts, weights, (0, 3)))
    assert torch.allclose(per_sample[0], common[0], atol=1e-5)
    assert torch.allclose(per_sample[1], common[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(per_sample[2], common[2]))
    assert common[2][2 + 3].abs().sum() > 0 and common[2][2 + 1].abs().sum() == 0
