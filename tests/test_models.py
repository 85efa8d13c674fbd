"""Reference models, init helper, classifier wrapper and digits data (grad_guard.models)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import compute_gradient_stats
from grad_guard.data import digits_dataset, digits_loader, make_loader, synthetic_dataset
from grad_guard.models import (
    DeepMLP,
    ImageClassifier,
    ResidualMLP,
    ResNet,
    init_weights,
    weight_layer_names,
)


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int = 10) -> None:
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    F.cross_entropy(out, torch.arange(x.shape[0]) % num_classes).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def _first_last_ratio(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """first/last Linear gradient-norm ratio of one backward pass, through grad_guard's core."""
    model.zero_grad(set_to_none=True)
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    norms = compute_gradient_stats(group_parameters(model)).to_dict()
    linears = [name for name in norms if name in set(weight_layer_names(model))]
    return norms[linears[0]] / norms[linears[-1]]


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(digits_loader(batch_size=64, seed=0)))


# --------------------------------------------------------------------------- DeepMLP


@pytest.mark.parametrize("depth", [1, 2, 5, 20])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "gelu"])
def test_deep_mlp_builds_and_runs(depth: int, activation: str) -> None:
    model = DeepMLP(64, 10, depth=depth, width=16, activation=activation, init="he")
    _forward_backward(model, torch.randn(8, 64))
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth


def test_deep_mlp_accepts_images() -> None:
    _forward_backward(DeepMLP(64, 10, depth=3), torch.randn(4, 1, 8, 8))


def test_deep_mlp_layer_grouping_is_one_layer_per_linear_in_forward_order() -> None:
    model = DeepMLP(64, 10, depth=12, width=8)
    names = [layer.name for layer in group_parameters(model)]
    assert names == [f"fc{i:02d}" for i in range(1, 12)] + ["head"]
    assert names == weight_layer_names(model)
    # zero-padded names sort in forward order (TensorBoard sorts tags as strings)
    assert sorted(names[:-1]) == names[:-1]


def test_deep_mlp_batch_norm() -> None:
    model = DeepMLP(64, 10, depth=4, width=8, batch_norm=True)
    assert [layer.name for layer in group_parameters(model)] == [
        "fc1", "bn1", "fc2", "bn2", "fc3", "bn3", "head"
    ]  # fmt: skip
    _forward_backward(model, torch.randn(6, 64))


# --------------------------------------------------------------------------- ResidualMLP


@pytest.mark.parametrize("depth", [2, 3, 8, 20])
def test_residual_mlp_builds_and_runs(depth: int) -> None:
    model = ResidualMLP(64, 10, depth=depth, width=16)
    _forward_backward(model, torch.randn(8, 64))
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth
    assert len(model.blocks) == depth - 2


def test_residual_mlp_layers_in_forward_order() -> None:
    names = [layer.name for layer in group_parameters(ResidualMLP(64, 10, depth=4, width=8))]
    assert names == [
        "stem", "blocks.1.norm", "blocks.1.linear", "blocks.2.norm", "blocks.2.linear",
        "norm", "head",
    ]  # fmt: skip


def test_residual_block_is_identity_plus_branch() -> None:
    model = ResidualMLP(4, 2, depth=3, width=4).eval()
    block = model.blocks[0]
    nn.init.zeros_(block.linear.weight)
    nn.init.zeros_(block.linear.bias)
    x = torch.randn(5, 4)
    torch.testing.assert_close(block(x), x)


# --------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("depth", [8, 14, 20])
@pytest.mark.parametrize("residual", [True, False])
def test_resnet_on_digits(depth: int, residual: bool) -> None:
    model = ResNet(in_channels=1, num_classes=10, depth=depth, width=4, residual=residual)
    _forward_backward(model, torch.randn(4, 1, 8, 8))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert convs + linears == depth


def test_resnet_on_32x32_rgb() -> None:
    _forward_backward(
        ResNet(in_channels=3, num_classes=10, depth=8, width=4), torch.randn(2, 3, 32, 32)
    )


def test_plain_resnet_has_the_same_parameters_and_differs_only_by_shortcuts() -> None:
    torch.manual_seed(0)
    residual = ResNet(1, 10, depth=14, width=4, residual=True)
    plain = ResNet(1, 10, depth=14, width=4, residual=False)
    assert [(n, p.shape) for n, p in residual.named_parameters()] == [
        (n, p.shape) for n, p in plain.named_parameters()
    ]
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(residual(x), plain(x))


def test_resnet_without_batch_norm() -> None:
    model = ResNet(1, 10, depth=8, width=4, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _forward_backward(model, torch.randn(2, 1, 8, 8))


def test_resnet_layer_names_follow_torchvision() -> None:
    names = [layer.name for layer in group_parameters(ResNet(1, 10, depth=8, width=2))]
    assert names[:4] == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]
    assert names[-1] == "fc"


# --------------------------------------------------------------------------- init_weights


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "gelu"])
def test_he_init_std(activation: str) -> None:
    torch.manual_seed(0)
    fan_in, fan_out = 1024, 512
    layer = init_weights(nn.Linear(fan_in, fan_out), "he", activation)
    gain = {"gelu": math.sqrt(2.0)}.get(activation) or nn.init.calculate_gain(
        activation, 0.01 if activation == "leaky_relu" else None
    )
    expected = gain / math.sqrt(fan_in)
    # 524288 samples: the std's relative sampling error is ~0.1%
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.01)
    assert layer.weight.mean().item() == pytest.approx(0.0, abs=expected * 0.01)
    assert torch.count_nonzero(layer.bias) == 0


def test_he_relu_is_sqrt_2_over_fan_in() -> None:
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(2048, 256), "he", "relu")
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.01)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_xavier_init_std(activation: str) -> None:
    torch.manual_seed(0)
    fan_in, fan_out = 1024, 512
    layer = init_weights(nn.Linear(fan_in, fan_out), "xavier", activation)
    expected = nn.init.calculate_gain(activation) * math.sqrt(2 / (fan_in + fan_out))
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.01)
    assert torch.count_nonzero(layer.bias) == 0


def test_init_covers_convolutions_and_leaves_norms_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Linear(512, 256))
    nn.init.constant_(model[1].weight, 3.0)
    init_weights(model, "he", "relu")
    # conv fan_in = in_channels * kernel area
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.01)
    assert model[2].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.01)
    assert torch.all(model[1].weight == 3.0)


def test_default_init_restores_pytorch_default() -> None:
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(1024, 512), "he")
    init_weights(layer, "default")
    # kaiming_uniform_(a=sqrt(5)): std = 1 / sqrt(3 * fan_in)
    assert layer.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 1024), rel=0.01)
    assert torch.count_nonzero(layer.bias) > 0


def test_models_apply_their_init() -> None:
    torch.manual_seed(0)
    model = DeepMLP(64, 10, depth=3, width=1024, activation="relu", init="he")
    assert model.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.02)
    xavier = DeepMLP(64, 10, depth=3, width=1024, activation="tanh", init="xavier")
    expected = 5 / 3 * math.sqrt(2 / 2048)
    assert xavier.fc2.weight.std().item() == pytest.approx(expected, rel=0.02)


# --------------------------------------------------------------------------- step-0 gradient flow


def test_sigmoid_default_mlp_vanishes_on_digits(digits_batch) -> None:
    torch.manual_seed(0)
    model = DeepMLP(64, 10, depth=20, activation="sigmoid", init="default")
    assert _first_last_ratio(model, digits_batch) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_he_mlp_keeps_gradients_flowing_on_digits(digits_batch, seed: int) -> None:
    torch.manual_seed(seed)
    model = DeepMLP(64, 10, depth=20, activation="relu", init="he")
    assert 0.1 < _first_last_ratio(model, digits_batch) < 10


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_mlp_keeps_gradients_flowing_on_digits(digits_batch, seed: int) -> None:
    torch.manual_seed(seed)
    model = ResidualMLP(64, 10, depth=20)
    assert 0.1 < _first_last_ratio(model, digits_batch) < 10


# --------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize(
    ("factory", "argument", "value"),
    [
        (lambda v: DeepMLP(64, 10, depth=v), "depth", 0),
        (lambda v: DeepMLP(64, 10, depth=v), "depth", 2.0),
        (lambda v: DeepMLP(64, 10, width=v), "width", 0),
        (lambda v: DeepMLP(v, 10), "in_features", -1),
        (lambda v: DeepMLP(64, v), "num_classes", 0),
        (lambda v: DeepMLP(64, 10, activation=v), "activation", "swish"),
        (lambda v: DeepMLP(64, 10, init=v), "init", "kaiming"),
        (lambda v: DeepMLP(64, 10, batch_norm=v), "batch_norm", "yes"),
        (lambda v: ResidualMLP(64, 10, depth=v), "depth", 1),
        (lambda v: ResidualMLP(64, 10, activation=v), "activation", "ReLU"),
        (lambda v: ResidualMLP(64, 10, init=v), "init", None),
        (lambda v: ResNet(1, 10, depth=v), "depth", 18),
        (lambda v: ResNet(1, 10, depth=v), "depth", 2),
        (lambda v: ResNet(v, 10), "in_channels", 0),
        (lambda v: ResNet(1, 10, width=v), "width", 0),
        (lambda v: ResNet(1, 10, residual=v), "residual", 1),
        (lambda v: ResNet(1, 10, init=v), "init", "orthogonal"),
        (lambda v: init_weights(nn.Linear(2, 2), init=v), "init", "he_normal"),
        (lambda v: init_weights(nn.Linear(2, 2), activation=v), "activation", "softplus"),
        (lambda v: ImageClassifier(nn.Linear(4, 3), lr=v), "lr", 0.0),
        (lambda v: ImageClassifier(nn.Linear(4, 3), momentum=v), "momentum", 1.0),
        (lambda v: ImageClassifier(nn.Linear(4, 3), optimizer=v), "optimizer", "rmsprop"),
        (lambda v: ImageClassifier(nn.Linear(4, 3), weight_decay=v), "weight_decay", -1e-4),
        (lambda v: ImageClassifier(nn.Linear(4, 3), num_classes=v), "num_classes", 1),
        (lambda v: ImageClassifier(v), "model", "mlp"),
        (lambda v: ImageClassifier(nn.Conv2d(1, 2, 3), num_classes=v), "num_classes", None),
        (lambda v: synthetic_dataset(n_samples=v), "n_samples", 0),
        (lambda v: synthetic_dataset(n_features=v, flatten=False), "n_features", 10),
        (lambda v: make_loader(synthetic_dataset(10), batch_size=v), "batch_size", 0),
    ],
)
def test_invalid_arguments_name_the_argument(factory, argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        factory(value)
    assert repr(value) in str(info.value) or type(value).__name__ in str(info.value)


def test_error_message_lists_the_allowed_values() -> None:
    with pytest.raises(ValueError) as info:
        DeepMLP(64, 10, activation="swish")
    message = str(info.value)
    assert "'swish'" in message
    for allowed in ("sigmoid", "tanh", "relu", "leaky_relu", "gelu"):
        assert repr(allowed) in message


# --------------------------------------------------------------------------- ImageClassifier


def test_classifier_training_step_logs_loss_and_accuracy() -> None:
    module = ImageClassifier(DeepMLP(64, 10, depth=2, width=8))
    logged = {}
    module.log = lambda name, value, **kwargs: logged.setdefault(name, value)  # type: ignore[method-assign]
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    loss = module.training_step((x, y), 0)
    assert loss.ndim == 0 and loss.requires_grad
    assert set(logged) == {"train_loss", "train_acc"}
    torch.testing.assert_close(logged["train_loss"], loss)


def test_classifier_optimizers() -> None:
    sgd = ImageClassifier(nn.Linear(4, 3), lr=0.05, momentum=0.9, weight_decay=1e-4)
    optimizer = sgd.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4
    adam = ImageClassifier(nn.Linear(4, 3), lr=1e-3, optimizer="adam").configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3


def test_classifier_trains_and_validates_with_a_trainer(tmp_path) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    data = synthetic_dataset(n_samples=128)
    module = ImageClassifier(DeepMLP(64, 10, depth=2, width=16, activation="relu"), lr=0.05)
    trainer = pl.Trainer(
        max_steps=4, limit_val_batches=1, val_check_interval=2, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, make_loader(data, 32), make_loader(data, 64, shuffle=False))
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics)
    assert 0.0 <= float(metrics["val_acc"]) <= 1.0


def test_classifier_infers_num_classes() -> None:
    assert ImageClassifier(ResNet(1, 7, depth=8, width=2)).num_classes == 7
    assert ImageClassifier(nn.Conv2d(1, 2, 3), num_classes=5).num_classes == 5


def test_models_package_does_not_import_lightning() -> None:
    code = (
        "import sys, grad_guard.models, grad_guard.data; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', "
        "'pytorch_lightning', 'torchmetrics')], 'lightning imported'; "
        "grad_guard.models.ImageClassifier; assert 'lightning' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- data


def test_digits_dataset() -> None:
    dataset = digits_dataset()
    x, y = dataset.tensors
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert x.mean(0).abs().max() < 1e-5
    std = x.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    images = digits_dataset(flatten=False).tensors[0]
    assert images.shape == (1797, 1, 8, 8)
    torch.testing.assert_close(images.flatten(1), x)


def test_digits_loader_is_reproducible() -> None:
    first = [y for _, y in digits_loader(batch_size=64, seed=3)]
    second = [y for _, y in digits_loader(batch_size=64, seed=3)]
    other = [y for _, y in digits_loader(batch_size=64, seed=4)]
    assert len(first) == 29
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0])
    assert len(list(digits_loader(batch_size=64, drop_last=True))) == 28


def test_synthetic_dataset_is_learnable_and_seeded() -> None:
    a, b = synthetic_dataset(seed=1), synthetic_dataset(seed=1)
    torch.testing.assert_close(a.tensors[0], b.tensors[0])
    x, y = a.tensors
    assert x.shape == (1797, 64) and int(y.max()) == 9
    assert synthetic_dataset(flatten=False).tensors[0].shape == (1797, 1, 8, 8)
    # nearest class mean classifies most points: the classes are separable
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(x, means).argmin(1) == y).float().mean()
    assert accuracy > 0.8
