"""A small CIFAR-style ResNet (He et al., 2016, section 4.2) and its plain twin."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from grad_guard.models.init import INITS, init_weights, validate_choice, validate_int


def _check_depth(depth: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"`depth` must be an int of the form 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, "
            f"...), got {depth!r}"
        )
    return depth


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; with ``residual=True`` the input is added back.

    When the block halves the resolution and doubles the channels, the shortcut is the
    parameter-free "option A" of the paper (subsample, zero-pad the new channels), so the
    residual and the plain block have exactly the same parameters.

    Args:
        in_channels: channels in.
        out_channels: channels out.
        stride: 1, or 2 to halve height and width.
        residual: add the shortcut (``False`` gives the plain block).
        batch_norm: use ``BatchNorm2d`` after each convolution.

    Example:
        >>> import torch
        >>> BasicBlock(4, 8, stride=2)(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        residual: bool = True,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"`stride` must be 1 or 2, got {stride!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()  # a module (not F.relu) so model inspection can see it
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.residual = residual
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of basic blocks, global pool, ``fc``.

    ``depth = 6n + 2`` weight layers (stem + ``3n`` blocks of two convolutions + ``fc``):
    20 gives ResNet-20, 56 ResNet-56. Stages have ``width``, ``2*width`` and
    ``4*width`` channels; stages 2 and 3 halve the resolution, so 8x8 digits end at 2x2
    and 32x32 images at 8x8 before the pool. ``residual=False`` gives the *plain* network
    of the paper with the very same layers and parameters, minus the shortcuts.

    Layers are named like torchvision's: ``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    ``fc``, in forward order.

    Args:
        in_channels: 1 (digits, grayscale) or 3 (RGB); any positive int works.
        num_classes: number of output logits.
        depth: 6n+2, n >= 1 (8, 14, 20, 32, 44, 56, 110, ...).
        width: channels of the first stage (>= 1).
        residual: ``True`` for the ResNet, ``False`` for the plain variant.
        batch_norm: ``BatchNorm2d`` after every convolution (``False`` drops it, which
            makes the plain variant much harder to train).
        init: ``"he"`` (default), ``"xavier"`` or ``"default"``, see
            :func:`grad_guard.models.init_weights`.

    Raises:
        ValueError: if an argument is out of range or not one of the allowed names.

    Example:
        >>> import torch
        >>> ResNet(in_channels=1, num_classes=10, depth=8)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> ResNet(in_channels=3, num_classes=10, depth=8, width=4)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        depth: int = 20,
        width: int = 16,
        residual: bool = True,
        batch_norm: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        validate_int("in_channels", in_channels, 1)
        validate_int("num_classes", num_classes, 1)
        _check_depth(depth)
        validate_int("width", width, 1)
        validate_choice("init", init, INITS)
        for argument, value in (("residual", residual), ("batch_norm", batch_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be a bool, got {value!r}")

        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        channels = width
        stages = []
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, residual, batch_norm))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        self.depth = depth
        self.width = width
        self.residual = residual
        self.batch_norm = batch_norm
        if init != "default":
            init_weights(self, init, "relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, residual={self.residual}"
