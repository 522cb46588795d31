"""The three downstream classifier families of DPImageBench's protocol (``dpfeta.evaluate.dpimagebench``):
a ResNet (basic blocks), a Wide ResNet (pre-activation, dropout) and a ResNeXt (grouped bottlenecks), for
any image size (global average pooling) and 1 or 3 channels.

DPImageBench trains its own definitions at their defaults for the 28-32 px grey and colour sets (WRN, ResNet,
ResNeXt; ResNet-164/WRN-28-10/ResNeXt-29 for CIFAR). These are the same families at sizes chosen for a CPU
(``depth`` and ``width`` set them): numbers from them line up with DPImageBench's protocol, not with its
exact networks.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False)


class _Head(nn.Module):
    """BatchNorm, ReLU, global average pooling, a linear layer."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(x)).mean(dim=(2, 3)))


class _Block(nn.Module):
    """Pre-activation basic block (ResNet, WRN): BN-ReLU-conv3, dropout, BN-ReLU-conv3, plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop: float):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), _conv3(c_in, c_out, stride)
        self.norm2, self.conv2 = nn.BatchNorm2d(c_out), _conv3(c_out, c_out)
        self.drop = nn.Dropout(drop)
        self.short = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(x))
        out = self.conv2(torch.relu(self.norm2(self.drop(self.conv1(h)))))
        return out + (x if self.short is None else self.short(h))


class _Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 down to ``groups * group_width``, grouped 3x3, 1x1 up; pre-activation."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, group_width: int, drop: float):
        super().__init__()
        inner = groups * group_width
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            _conv3(inner, inner, stride, groups=groups),
            nn.Dropout(drop),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, c_out, 1, bias=False),
        )
        self.short = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.short is None else self.short(x))


class _Stages(nn.Module):
    """A stem conv, three stages of ``blocks`` blocks (stride 1, 2, 2), and the head."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int], blocks: int, make):
        super().__init__()
        layers: list[nn.Module] = [_conv3(in_channels, widths[0])]
        c = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                layers.append(make(c, width, 2 if stage > 0 and i == 0 else 1))
                c = width
        self.body = nn.Sequential(*layers)
        self.head = _Head(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _blocks(depth: int, per_block: int, name: str) -> int:
    if depth < 2 + 3 * per_block or (depth - 2) % (3 * per_block):
        raise ValueError(f"expected a {name} depth of 2 + {3 * per_block}k (k >= 1), got {depth}")
    return (depth - 2) // (3 * per_block)


def resnet(in_channels: int, num_classes: int, *, depth: int = 8, width: int = 16) -> nn.Module:
    """ResNet-``depth`` (6k + 2) with basic blocks of width ``width``, 2x and 4x."""
    widths = (width, 2 * width, 4 * width)
    return _Stages(in_channels, num_classes, widths, _blocks(depth, 2, "ResNet"), lambda a, b, s: _Block(a, b, s, 0.0))


def wide_resnet(in_channels: int, num_classes: int, *, depth: int = 8, width: int = 2, drop: float = 0.3) -> nn.Module:
    """WRN-``depth``-``width`` (6k + 2): widths 16, 32, 64 times ``width``, dropout ``drop`` inside each block."""
    widths = (16 * width, 32 * width, 64 * width)
    return _Stages(in_channels, num_classes, widths, _blocks(depth, 2, "WRN"), lambda a, b, s: _Block(a, b, s, drop))


def resnext(
    in_channels: int, num_classes: int, *, depth: int = 11, groups: int = 4, group_width: int = 4, drop: float = 0.3
) -> nn.Module:
    """ResNeXt-``depth`` (9k + 2), cardinality ``groups`` of ``group_width`` channels (doubled per stage)."""

    def make(c_in: int, c_out: int, stride: int) -> nn.Module:
        return _Bottleneck(c_in, c_out, stride, groups, group_width * c_out // 64, drop)

    return _Stages(in_channels, num_classes, (64, 128, 256), _blocks(depth, 3, "ResNeXt"), make)


CLASSIFIERS = {"resnet": resnet, "wrn": wide_resnet, "resnext": resnext}  # DPImageBench's order
