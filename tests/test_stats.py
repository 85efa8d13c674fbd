import math

import pytest
import torch
from torch import nn

from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer, LayerNormComputer, compute_gradient_stats


def _model_with_grads(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    model.to(dtype)
    model(torch.randn(10, 6, dtype=dtype)).square().sum().backward()
    return model


def _reference(modules, p):
    return torch.stack(
        [
            torch.linalg.vector_norm(
                torch.cat([q.grad.double().flatten() for q in m.parameters()]), p
            )
            for m in modules
        ]
    )


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_layer_and_total_norms_match_independent_computation(norm_type):
    model = _model_with_grads()
    stats = compute_gradient_stats(group_parameters(model), norm_type)
    expected = _reference([model[0], model[2], model[4]], norm_type)
    torch.testing.assert_close(stats.layer_norms.double(), expected, rtol=1e-5, atol=0)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
    torch.testing.assert_close(stats.total_norm, total, rtol=1e-5, atol=0)
    assert stats.layer_names == ("0", "2", "4")
    assert not stats.nonfinite.any()


def test_half_precision_gradients_do_not_overflow_the_norm():
    layer = nn.Linear(512, 512).half()
    layer.weight.grad = torch.full_like(layer.weight, 200.0)  # norm 102400 > fp16 max
    stats = compute_gradient_stats(group_parameters(layer))
    assert stats.layer_norms.dtype == torch.float32
    assert stats.layer_norms[0].item() == pytest.approx(200.0 * 512, rel=1e-3)
    assert not stats.nonfinite.any()


def test_nonfinite_flags_name_the_layer():
    model = _model_with_grads()
    model[2].weight.grad[3, 4] = float("nan")
    model[4].bias.grad[0] = float("inf")
    stats = compute_gradient_stats(group_parameters(model))
    assert stats.nonfinite.tolist() == [False, True, True]
    assert bool(stats.any_nonfinite)


def test_layers_without_gradient_are_marked_and_zero():
    model = _model_with_grads()
    model[2].weight.grad = None
    model[2].bias.grad = None
    stats = compute_gradient_stats(group_parameters(model))
    assert stats.has_grad == (True, False, True)
    assert stats.layer_norms[1].item() == 0.0
    assert set(stats.to_dict()) == {"0", "4"}
    assert len(stats.grads) == 4


def test_computer_reuses_index_tensors_across_steps():
    model = _model_with_grads()
    computer = GradientStatsComputer(group_parameters(model))
    first = computer()
    plan = computer._plans[(True,) * 6]
    for p in model.parameters():
        p.grad = p.grad * 2  # new gradient tensors, as after zero_grad(set_to_none=True)
    second = computer()
    assert computer._plans == {(True,) * 6: plan}  # the same plan, nothing rebuilt
    torch.testing.assert_close(second.layer_norms, 2 * first.layer_norms)
    assert computer.passes == 2


def test_sparse_gradient_norm_is_that_of_its_dense_form():
    embedding = nn.Embedding(10, 3, sparse=True)
    linear = nn.Linear(3, 1)
    model = nn.ModuleDict({"embedding": embedding, "linear": linear})
    # index 1 twice: an uncoalesced sparse gradient, whose duplicates must be summed
    linear(embedding(torch.tensor([1, 2, 1]))).sum().backward()
    stats = GradientStatsComputer(group_parameters(model))()
    dense = embedding.weight.grad.to_dense()
    assert stats.layer_norms[0].item() == pytest.approx(dense.norm().item(), rel=1e-6)
    embedding.weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[3]]), torch.tensor([[float("nan"), 0.0, 0.0]]), (10, 3)
    )
    assert GradientStatsComputer(group_parameters(model))().nonfinite.tolist() == [True, False]


def test_mixed_dtypes_are_grouped_and_combined():
    a = torch.ones(4, dtype=torch.float16)
    b = torch.ones(9, dtype=torch.float64)
    norms = LayerNormComputer(1)([[a, b]])
    assert norms.item() == pytest.approx(math.sqrt(13))


@pytest.mark.parametrize("norm_type", [0, -1, "l2", float("nan")])
def test_invalid_norm_type(norm_type):
    with pytest.raises(ValueError, match="`norm_type`"):
        GradientStatsComputer([], norm_type)


def test_plan_follows_gradients_that_come_and_go_and_a_cast_model():
    model = _model_with_grads()
    computer = GradientStatsComputer(group_parameters(model, "parameter"))
    full = computer()
    torch.testing.assert_close(
        full.layer_norms, torch.stack([p.grad.norm() for p in model.parameters()])
    )
    model[2].bias.grad = None  # a new pattern: a second plan, the first one kept
    partial = computer()
    assert partial.has_grad == (True, True, True, False, True, True)
    assert partial.layer_norms[3].item() == 0.0
    assert len(partial.grads) == len(partial.params) == 5
    assert [len(g) for g in partial.layer_grads] == [1, 1, 1, 0, 1, 1]
    assert len(computer._plans) == 2
    model.double()  # same parameters, new dtype: the plan is made again
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cast = computer()
    assert cast.layer_norms.dtype == torch.float64
    expected = [p.numel() ** 0.5 for p in model.parameters()]
    torch.testing.assert_close(cast.layer_norms, torch.tensor(expected, dtype=torch.float64))


def test_a_gradient_that_turns_sparse_leaves_the_plan():
    embedding = nn.Embedding(10, 3)
    model = nn.ModuleDict({"embedding": embedding})
    embedding.weight.grad = torch.ones(10, 3)
    computer = GradientStatsComputer(group_parameters(model))
    assert computer().layer_norms.item() == pytest.approx(30**0.5)
    embedding.weight.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 3), (10, 3))
    assert computer().layer_norms.item() == pytest.approx(3**0.5)
    assert computer().layer_norms.item() == pytest.approx(3**0.5)  # planned as sparse now
