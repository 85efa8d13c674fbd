import pytest
import torch
from torch import nn

from grad_guard.core.layers import ROOT_LAYER_NAME, group_parameters


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(1))


def test_module_granularity_groups_weight_and_bias_in_definition_order():
    layers = group_parameters(Encoder())
    assert [layer.name for layer in layers] == [
        ROOT_LAYER_NAME,
        "embed",
        "layers.0",
        "layers.1",
        "head",
    ]
    assert layers[2].param_names == ("layers.0.weight", "layers.0.bias")


def test_tied_parameter_counted_once_under_first_owner():
    model = Encoder()
    layers = group_parameters(model)
    all_params = [p for layer in layers for p in layer.params]
    assert len(all_params) == len({id(p) for p in all_params})
    head = next(layer for layer in layers if layer.name == "head")
    assert head.param_names == ("head.bias",)


def test_parameter_and_depth_granularity():
    model = Encoder()
    by_param = [layer.name for layer in group_parameters(model, "parameter")]
    assert by_param[:3] == ["scale", "embed.weight", "layers.0.weight"]
    by_depth = [layer.name for layer in group_parameters(model, 1)]
    assert by_depth == [ROOT_LAYER_NAME, "embed", "layers", "head"]
    layers_group = group_parameters(model, 1)[2]
    assert len(layers_group.params) == 4


def test_include_exclude_and_frozen():
    model = Encoder()
    model.layers[1].requires_grad_(False)
    names = [layer.name for layer in group_parameters(model, include=r"^layers", exclude=None)]
    assert names == ["layers.0"]
    names = [layer.name for layer in group_parameters(model, exclude=[r"embed", r"head"])]
    assert names == [ROOT_LAYER_NAME, "layers.0"]


def test_restrict_to_parameters_of_one_optimizer():
    model = Encoder()
    layers = group_parameters(model, parameters=list(model.layers.parameters()))
    assert [layer.name for layer in layers] == ["layers.0", "layers.1"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"granularity": "layer"}, "granularity"),
        ({"granularity": 0}, "granularity"),
        ({"granularity": True}, "granularity"),
        ({"include": "("}, "include"),
        ({"exclude": ["ok", 3]}, "exclude"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        group_parameters(Encoder(), **kwargs)
