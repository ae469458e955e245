"""DenseNet-121 (common in radiology work): torchvision's densenet121 builder (no weights), with torchvision's module
names (`features.conv0`, `features.denseblock4`, `classifier`), so torchvision weight files load.

Made Opacus-compatible here, the usual traps: every ReLU out of place (torchvision's are in place, in the dense
layers, the transitions, the stem and DenseNet.forward: Opacus' backward hooks need the activations they saw
intact); no memory-efficient checkpointing (it re-runs the layers in backward, behind the hooks' back); BatchNorm →
GroupNorm for norm "group" (the constructor takes no norm layer). The dense blocks' `torch.cat` needs nothing: each
layer still runs once per forward, which is what the per-sample gradient hooks assume.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet121 as tv_densenet121

from common.backbones.base import Layout, SpineNet, batch_norms_to_group_norms

# Weight files saved before torchvision 0.3 name dense-layer parts `norm.1`, `conv.2`, ...; today `norm1`, `conv2`.
_LEGACY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def _current_key(key: str) -> str:
    return _LEGACY.sub(r"\1\2.", key)


class SpineDenseNet(SpineNet):
    def __init__(self, arch: str, tv: nn.Module, norm: str, input_mode: str):
        super().__init__()
        self.features, self.classifier = tv.features, tv.classifier
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        if norm == "group":
            batch_norms_to_group_norms(self.features)
        n_blocks = sum(1 for name, _ in self.features.named_children() if name.startswith("denseblock"))
        layout = Layout(
            first_conv="features.conv0",
            stages=tuple(f"features.denseblock{i}" for i in range(1, n_blocks + 1)),
            last_stage=(f"features.denseblock{n_blocks}", "features.norm5"),  # norm5 normalises the last block only
            head="classifier",
            gradcam_layer="features.norm5",
            legacy_key=_current_key,
        )
        self.attach_input(arch, norm, input_mode, layout)

    def logits(self, x: Tensor) -> Tensor:
        # torchvision's DenseNet.forward, with its in-place ReLU made out of place.
        out = F.adaptive_avg_pool2d(torch.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet121(norm: str, input_mode: str) -> SpineDenseNet:
    tv = tv_densenet121(weights=None, num_classes=1, memory_efficient=False)
    return SpineDenseNet("densenet121", tv, norm, input_mode)
