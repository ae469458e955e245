"""The one model builder that client and server share, so that state-dict layouts always match.

A torchvision ResNet (ResNet50 by default) with one "malignant" logit. The 6-channel stack (T1[-1..+1], T2[-1..+1])
enters either through a 1x1 convolution 6->3 in front of the standard 3-channel network ("adapter", the paper's
group) or through a 6-channel first convolution ("conv1"). State-dict keys are torchvision's (`conv1.weight`,
`layer4.2.bn3.running_var`, `fc.weight`, ...) plus `adapter.weight`/`adapter.bias` in adapter mode, so torchvision
weight files load with no key renaming.

Both input modes start from the same function: the adapter's fixed initialisation A (R = T1 neighbours, G = T2
neighbours, B = their mean; each row sums to 1) and, in conv1 mode, the 6-channel conv1 initialised as W·A (the
3-channel filters composed with A). A backbone pretrained behind a frozen adapter (simulations/pretrain.py) therefore
loads into either mode with no loss.

Blocks are always built out of place (no in-place ReLU, no `out += identity`): Opacus' per-sample gradient hooks
break on in-place ops (opacus#828), and one block type for both norms keeps a single code path.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.errors import SpineFedError

log = logging.getLogger(__name__)

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
INPUT_MODES = ("adapter", "conv1")
NORMS = ("batch", "group")
TRAINABLE = ("all", "layer4+head", "head")
# Top-level modules that train in each partial mode; everything else (adapter, stem, layer1-3) is frozen. The adapter
# is frozen in partial modes on purpose: training it would need a backward pass through the whole frozen backbone,
# which costs the time (and, under DP, the noise) the partial modes exist to save.
_TRAINABLE_MODULES = {"layer4+head": ("layer4", "fc"), "head": ("fc",)}
GROUPS = 32  # GroupNorm groups: divides every ResNet width (64..2048), the usual choice (Wu & He 2018)
_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

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
class ModelConfig:
    """What defines the network; travels with experiments as plain values (to_dict/from_dict)."""

    arch: str = "resnet50"
    input_mode: str = "adapter"
    norm: str = "batch"
    trainable: str = "all"
    pretrained: Path | None = None
    image_size: int = 224

    def __post_init__(self):
        for name, allowed in (("arch", tuple(ARCHS)), ("input_mode", INPUT_MODES), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"model.trainable: expected one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, Path):
            object.__setattr__(self, "pretrained", Path(self.pretrained))
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"model.image_size: expected an integer >= 16, got {self.image_size!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pretrained"] = None if self.pretrained is None else str(self.pretrained)
        return d


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
    """torchvision's BasicBlock computed out of place (for resnet18/34, used in fast tests)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._relu(out + identity)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


class SpineNet(ResNet):
    """ResNet over a 6-channel stack → one logit per image, shape (N,).

    `train()` keeps the modules frozen by `apply_trainable` in eval mode, so their BatchNorm statistics never move,
    whoever calls `train()` (fit, a wrapper such as Opacus' GradSampleModule, a user).
    """

    def __init__(self, cfg: ModelConfig):
        kind, layers = ARCHS[cfg.arch]
        block = PlainBottleneck if kind == "bottleneck" else PlainBasicBlock
        norm_layer = _group_norm if cfg.norm == "group" else None
        super().__init__(block, layers, num_classes=1, norm_layer=norm_layer)
        self.relu = nn.ReLU(inplace=False)
        self.input_mode = cfg.input_mode
        self.arch = cfg.arch
        self.norm = cfg.norm
        self.trainable = "all"
        if cfg.input_mode == "adapter":
            self.adapter = nn.Conv2d(6, 3, kernel_size=1, bias=True)
            with torch.no_grad():
                self.adapter.weight.copy_(ADAPTER_INIT[:, :, None, None])
                self.adapter.bias.zero_()
        else:
            w3 = self.conv1.weight.detach()
            self.conv1 = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                self.conv1.weight.copy_(conv1_from_rgb(w3))

    def forward(self, x: Tensor) -> Tensor:
        if self.input_mode == "adapter":
            x = self.adapter(x)
        return self._forward_impl(x).squeeze(-1)

    def train(self, mode: bool = True) -> SpineNet:
        super().train(mode)
        if mode:
            for name in frozen_modules(self.trainable):
                child = getattr(self, name, None)
                if child is not None:
                    child.eval()
        return self


def conv1_from_rgb(w3: Tensor) -> Tensor:
    """(64, 3, k, k) RGB filters → (64, 6, k, k) filters equal to "adapter at its initialisation, then w3"."""
    return torch.einsum("oikl,ij->ojkl", w3, ADAPTER_INIT.to(w3.dtype))


def frozen_modules(trainable: str) -> list[str]:
    """Top-level module names that do not train in this mode (empty for 'all')."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable: expected one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable == "all":
        return []
    keep = _TRAINABLE_MODULES[trainable]
    names = ["adapter", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    return [n for n in names if n not in keep]


def _is_trainable_key(key: str, trainable: str) -> bool:
    if trainable == "all":
        return True
    return key.split(".", 1)[0] in _TRAINABLE_MODULES[trainable]


def unwrap(model: nn.Module) -> nn.Module:
    """The SpineNet inside wrappers (Opacus GradSampleModule `_module`, torch.compile `_orig_mod`, DDP `module`)."""
    seen = 0
    while not isinstance(model, SpineNet) and seen < 8:
        inner = getattr(model, "_module", None) or getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    return model


def build_model(cfg: ModelConfig) -> SpineNet:
    """Build the network for `cfg`, load `cfg.pretrained` if given, and apply `cfg.trainable`."""
    model = SpineNet(cfg)
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained, cfg.input_mode)
    else:
        log.warning(
            "model %s/%s/%s-norm: no pretrained weights given, training from scratch (random initialisation)",
            cfg.arch,
            cfg.input_mode,
            cfg.norm,
        )
    apply_trainable(model, cfg.trainable)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SpineFedError(
            f"pretrained weights {path}: file not found (weights are never downloaded; name a local file)"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user-facing problem
        raise SpineFedError(
            f"pretrained weights {path}: not a readable PyTorch file ({exc.__class__.__name__})"
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise SpineFedError(f"pretrained weights {path}: expected a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained(model: nn.Module, path: Path, input_mode: str | None = None) -> None:
    """Load a torchvision ResNet state dict, or one saved from `build_model`, into `model`.

    torchvision layout (3-channel conv1, no adapter): backbone loaded; fc of any size ignored and the head left freshly
    initialised; the adapter keeps its fixed initialisation; in conv1 mode the 3-channel filters become 6-channel ones
    composed with that initialisation (`conv1_from_rgb`). A build_model layout (adapter keys, or a 6-channel conv1)
    loads completely, head included. Into a group-norm model only the norms' affine parameters load (BN running
    statistics have no GroupNorm counterpart, as with Opacus' ModuleValidator.fix). Anything else is a SpineFedError.
    """
    net = unwrap(model)
    if not isinstance(net, SpineNet):
        raise TypeError("load_pretrained expects a model from build_model")
    if input_mode is not None and input_mode != net.input_mode:
        raise ValueError(f"input_mode {input_mode!r} does not match the model's {net.input_mode!r}")
    sd = _read_state_dict(path)
    name = Path(path).name
    if "conv1.weight" not in sd:
        raise SpineFedError(f"pretrained weights {name}: not a ResNet state dict (no conv1.weight)")
    in_ch = sd["conv1.weight"].shape[1]
    if in_ch not in (3, 6):
        raise SpineFedError(f"pretrained weights {name}: conv1 takes {in_ch} channels; expected 3 (torchvision) or 6")
    torchvision_layout = in_ch == 3 and not any(k.startswith("adapter.") for k in sd)
    if not torchvision_layout and (in_ch == 6) != (net.input_mode == "conv1"):
        raise SpineFedError(
            f"pretrained weights {name}: saved from a {'conv1' if in_ch == 6 else 'adapter'}-mode model, "
            f"cannot load into {net.input_mode} mode; use a torchvision-layout file"
        )

    target = net.state_dict()
    new: dict[str, Tensor] = {}
    missing = []
    for key, value in target.items():
        top = key.split(".", 1)[0]
        if torchvision_layout and top in ("fc", "adapter"):
            continue  # head re-initialised, adapter keeps its fixed initialisation
        if key not in sd:
            missing.append(key)
            continue
        src = sd[key]
        if key == "conv1.weight" and net.input_mode == "conv1" and src.shape[1] == 3:
            src = conv1_from_rgb(src.float())
        if tuple(src.shape) != tuple(value.shape):
            raise SpineFedError(
                f"pretrained weights {name}: {key} has shape {tuple(src.shape)}, the {net.arch} model expects "
                f"{tuple(value.shape)} (another architecture?)"
            )
        new[key] = src.to(value.dtype)
    if missing:
        raise SpineFedError(
            f"pretrained weights {name}: {len(missing)} tensor(s) missing for {net.arch}/{net.norm}-norm, "
            f"e.g. {', '.join(missing[:3])} (another architecture, or a group-norm file into a batch-norm model?)"
        )
    known = set(target) | {k for k in sd if k.startswith("fc.")}  # any head size is accepted and ignored
    if net.norm == "group":
        known |= {k for k in sd if k.rsplit(".", 1)[-1] in _NORM_BUFFERS}
    extra = sorted(set(sd) - known)
    if extra:
        raise SpineFedError(
            f"pretrained weights {name}: {len(extra)} unexpected tensor(s) for {net.arch}, e.g. {', '.join(extra[:3])}"
        )
    with torch.no_grad():
        for key, value in new.items():
            target[key].copy_(value)
    log.info(
        "loaded pretrained weights %s (%s layout%s%s)",
        name,
        "torchvision" if torchvision_layout else "spinefed",
        "; head re-initialised" if torchvision_layout else "",
        "; BN running statistics dropped for GroupNorm" if net.norm == "group" else "",
    )


def apply_trainable(model: nn.Module, trainable: str) -> None:
    """Set requires_grad by trainable mode and put the frozen modules (and their BN) in eval mode.

    SpineNet.train() re-applies the eval part by itself; calling this again after `train()` is harmless.
    """
    net = unwrap(model)
    frozen = set(frozen_modules(trainable))
    for name, param in net.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] not in frozen)
    if isinstance(net, SpineNet):
        net.trainable = trainable
    for name in frozen:
        child = getattr(net, name, None)
        if child is not None:
            child.eval()


def exchange_keys(model: nn.Module, trainable: str) -> list[str]:
    """State-dict keys that travel, in state-dict order: the trainable parameters and the trainable part's BN buffers."""
    frozen_modules(trainable)  # validates the name
    return [k for k in unwrap(model).state_dict() if _is_trainable_key(k, trainable)]


def get_exchange_arrays(model: nn.Module, trainable: str) -> OrderedDict[str, np.ndarray]:
    """The exchanged tensors as CPU numpy copies (float32 parameters/statistics, int64 batch counters)."""
    sd = unwrap(model).state_dict()
    return OrderedDict((k, sd[k].detach().to("cpu", copy=True).numpy()) for k in exchange_keys(model, trainable))


def set_exchange_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray | Tensor], trainable: str) -> None:
    """Load exchanged tensors. Strict: exactly the exchange keys with their shapes, else ValueError naming the key."""
    keys = exchange_keys(model, trainable)
    missing = [k for k in keys if k not in arrays]
    unexpected = sorted(set(arrays) - set(keys))
    if missing:
        raise ValueError(f"exchanged tensors: {len(missing)} missing for trainable={trainable}, e.g. {missing[0]}")
    if unexpected:
        raise ValueError(f"exchanged tensors: unexpected key {unexpected[0]} for trainable={trainable}")
    sd = unwrap(model).state_dict()
    for k in keys:
        if tuple(np.shape(arrays[k])) != tuple(sd[k].shape):
            raise ValueError(f"exchanged tensor {k}: shape {tuple(np.shape(arrays[k]))}, expected {tuple(sd[k].shape)}")
    with torch.no_grad(), warnings.catch_warnings():
        # Received tensors may be read-only views into the message (common/transfer.py): only read here (copy_).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k in keys:
            sd[k].copy_(torch.as_tensor(np.asarray(arrays[k]) if not isinstance(arrays[k], Tensor) else arrays[k]))


def is_norm_buffer(key: str) -> bool:
    """True for BatchNorm running statistics: the server averages these plainly, never through a server optimizer."""
    return key.rsplit(".", 1)[-1] in _NORM_BUFFERS
