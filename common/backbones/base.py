"""What every backbone builder returns: a SpineNet, i.e. the torchvision network (same module names, so torchvision
weight files load with no renaming) behind the 6-channel input, with a Layout that names its parts.

A builder `name(norm, input_mode) -> SpineNet` constructs the 3-channel network with one logit, in its
Opacus-compatible form (no in-place op anywhere in the forward pass; BatchNorm replaced by GroupNorm for norm "group",
with the same keys for the affine parameters), and ends with `attach_input`. The Layout names, as dotted module paths that are also
state-dict prefixes: the first convolution, the feature stages, what "last-stage+head" trains, the head, and the
default Grad-CAM layer. The shared code (common/model.py, dp_training, gradcam) reads only these.

Both input modes start from the same function: the adapter's fixed initialisation A (R = T1 neighbours, G = T2
neighbours, B = their mean; each row sums to 1) and, in conv1 mode, the 6-channel first convolution initialised as
W·A (the 3-channel filters composed with A). A backbone pretrained behind a frozen adapter (simulations/pretrain.py)
therefore loads into either mode with no loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.backbones import trainable_group

GROUPS = 32  # GroupNorm groups: divides every ResNet and DenseNet-121 width (64..2048), the usual choice (Wu & He 2018)

# Adapter initialisation, rows = RGB outputs, columns = T1[-1], T1[0], T1[+1], T2[-1], T2[0], T2[+1]. The lesion slice
# weighs twice its neighbours; R/G keep T1 and T2 apart so that the colour-opponent filters of a 3-channel backbone
# see the T1/T2 contrast (low T1 with bright T2 is the fracture's main sign) from the first step.
ADAPTER_INIT = torch.tensor(
    [
        [0.25, 0.5, 0.25, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.25],
        [0.125, 0.25, 0.125, 0.125, 0.25, 0.125],
    ]
)


@dataclass(frozen=True)
class Layout:
    """Where the shared code finds a backbone's parts, as dotted module paths (= state-dict key prefixes)."""

    first_conv: str  # the 3-channel first convolution; takes the 6 channels in input mode "conv1"
    stages: tuple[str, ...]  # the feature stages, input to output
    last_stage: tuple[str, ...]  # trained with the head in "last-stage+head" (the last stage and, e.g., its norm)
    head: str
    gradcam_layer: str  # the last spatial feature map before pooling
    # Renames a key of an older weight-file layout of this architecture to the current one (None: no older layout).
    legacy_key: Callable[[str], str] | None = None

    def trainable_paths(self, trainable: str) -> tuple[str, ...] | None:
        """The modules that train in this trainable group (an alias resolves); None for 'all'."""
        group = trainable_group(trainable)
        if group == "all":
            return None
        return (self.head,) if group == "head" else (*self.last_stage, self.head)


def under(name: str, paths: tuple[str, ...] | None) -> bool:
    """True if the parameter/buffer/module `name` lies in one of `paths` (None: everything)."""
    return paths is None or any(name == p or name.startswith(p + ".") for p in paths)


def frozen_submodules(net: nn.Module, paths: tuple[str, ...] | None) -> Iterator[tuple[str, nn.Module]]:
    """The largest submodules holding nothing that trains, in registration order (none when `paths` is None)."""
    if paths is None:
        return

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in paths:
                continue
            if any(p.startswith(path + ".") for p in paths):
                yield from walk(child, path + ".")
            else:
                yield path, child

    yield from walk(net, "")


def conv1_from_rgb(w3: Tensor) -> Tensor:
    """(C, 3, k, k) RGB filters → (C, 6, k, k) filters equal to "adapter at its initialisation, then w3"."""
    return torch.einsum("oikl,ij->ojkl", w3, ADAPTER_INIT.to(w3.dtype))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


def batch_norms_to_group_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d by a GroupNorm under the same name (weight/bias keys kept; statistics dropped), for
    backbones whose constructor takes no norm layer. Both initialise weight 1, bias 0."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm(child.num_features))
        else:
            batch_norms_to_group_norms(child)


class SpineNet(nn.Module):
    """Base of every backbone's network: a 6-channel stack → one logit per image, shape (N,).

    A subclass is the torchvision network (its modules, its names) and implements `logits` (3-channel input → (N, 1)).
    `train()` keeps the modules frozen by `apply_trainable` in eval mode, so their BatchNorm statistics never move,
    whoever calls `train()` (fit, a wrapper such as Opacus' GradSampleModule, a user).
    """

    arch: str
    norm: str
    input_mode: str
    layout: Layout
    trainable: str = "all"

    def attach_input(self, arch: str, norm: str, input_mode: str, layout: Layout) -> None:
        """Last step of a builder: the 6-channel entry. Registered after the backbone's modules, so adapter keys
        come last in the state dict."""
        self.arch, self.norm, self.input_mode, self.layout = arch, norm, input_mode, layout
        self.trainable = "all"
        if input_mode == "adapter":
            self.adapter = nn.Conv2d(6, 3, kernel_size=1, bias=True)
            with torch.no_grad():
                self.adapter.weight.copy_(ADAPTER_INIT[:, :, None, None])
                self.adapter.bias.zero_()
            return
        parent_path, _, attr = layout.first_conv.rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self
        old = getattr(parent, attr)
        w3 = old.weight.detach()
        new = nn.Conv2d(
            6, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding, bias=old.bias is not None
        )
        with torch.no_grad():
            new.weight.copy_(conv1_from_rgb(w3))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, attr, new)

    def logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.input_mode == "adapter":
            x = self.adapter(x)
        return self.logits(x).squeeze(-1)

    def train(self, mode: bool = True) -> SpineNet:
        super().train(mode)
        if mode:
            for _, child in frozen_submodules(self, self.layout.trainable_paths(self.trainable)):
                child.eval()
        return self
