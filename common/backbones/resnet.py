"""ResNet18/34/50: torchvision's ResNet with its own module names (`conv1`, `layer1`..`layer4`, `fc`), so torchvision
weight files load unchanged, built from out-of-place blocks: Opacus' per-sample gradient hooks break on in-place ops
(in-place ReLU, `out += identity`; opacus#828), and one block type for both norms keeps a single code path."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.backbones.base import Layout, SpineNet, group_norm


class _OutOfPlace:
    """Mixin: ReLU not in place. Opacus' backward hooks need the activations they saw intact."""

    def _relu(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class PlainBottleneck(_OutOfPlace, Bottleneck):
    """torchvision's Bottleneck with the same parameters and keys, computed out of place (opacus#828)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._relu(self.bn1(self.conv1(x)))
        out = self._relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._relu(out + identity)


class PlainBasicBlock(_OutOfPlace, BasicBlock):
    """torchvision's BasicBlock computed out of place (resnet18/34)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._relu(out + identity)


class SpineResNet(SpineNet, ResNet):
    def __init__(self, arch: str, block: type[nn.Module], layers: list[int], norm: str, input_mode: str):
        ResNet.__init__(self, block, layers, num_classes=1, norm_layer=group_norm if norm == "group" else None)
        self.relu = nn.ReLU(inplace=False)
        layout = Layout(
            first_conv="conv1",
            stages=("layer1", "layer2", "layer3", "layer4"),
            last_stage=("layer4",),
            head="fc",
            gradcam_layer=f"layer4.{len(self.layer4) - 1}",
        )
        self.attach_input(arch, norm, input_mode, layout)

    def logits(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def resnet18(norm: str, input_mode: str) -> SpineResNet:
    return SpineResNet("resnet18", PlainBasicBlock, [2, 2, 2, 2], norm, input_mode)


def resnet34(norm: str, input_mode: str) -> SpineResNet:
    return SpineResNet("resnet34", PlainBasicBlock, [3, 4, 6, 3], norm, input_mode)


def resnet50(norm: str, input_mode: str) -> SpineResNet:
    return SpineResNet("resnet50", PlainBottleneck, [3, 4, 6, 3], norm, input_mode)
