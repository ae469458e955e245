"""The one model builder that client and server share, so that state-dict layouts always match.

A registered backbone (common/backbones: ResNet18/34/50, DenseNet-121; ResNet50 by default) with one "malignant"
logit. The 6-channel stack (T1[-1..+1], T2[-1..+1]) enters either through a 1x1 convolution 6->3 in front of the
standard 3-channel network ("adapter", the paper's group) or through a 6-channel first convolution ("conv1").
State-dict keys are torchvision's (`conv1.weight`, `layer4.2.bn3.running_var`, `fc.weight`, ...; `features.conv0.weight`
... for DenseNet) plus `adapter.weight`/`adapter.bias` in adapter mode, so torchvision weight files load with no key
renaming.

Nothing here names a backbone's modules: the first convolution, the trainable groups' modules and the head come from
the network's Layout (common/backbones/base.py), the choices and their validation from the registry.
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

from common.backbones import ARCHS, DEFAULT_ARCH, INPUT_MODES, NORMS, TRAINABLE, builder
from common.backbones.base import ADAPTER_INIT, GROUPS, SpineNet, conv1_from_rgb, frozen_submodules, under  # noqa: F401
from common.errors import SpineFedError

log = logging.getLogger(__name__)

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class ModelConfig:
    """What defines the network; travels with experiments as plain values (to_dict/from_dict)."""

    arch: str = DEFAULT_ARCH
    input_mode: str = "adapter"
    norm: str = "batch"
    trainable: str = "all"
    pretrained: Path | None = None
    image_size: int = 224

    def __post_init__(self):
        for name, allowed in (("arch", ARCHS), ("input_mode", INPUT_MODES), ("norm", NORMS)):
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


def network(cfg: ModelConfig) -> SpineNet:
    """The registered backbone for `cfg`, freshly initialised: no weights loaded, all of it trainable."""
    return builder(cfg.arch)(cfg.norm, cfg.input_mode)


def frozen_modules(model: nn.Module, trainable: str) -> list[str]:
    """Dotted names of the largest modules that do not train in this group (empty for 'all')."""
    net = unwrap(model)
    return [name for name, _ in frozen_submodules(net, net.layout.trainable_paths(trainable))]


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
    model = network(cfg)
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
    """Load a torchvision state dict of the model's architecture, or one saved from `build_model`, into `model`.

    torchvision layout (3-channel first convolution, no adapter): backbone loaded; a head of any size ignored and the
    head left freshly initialised; the adapter keeps its fixed initialisation; in conv1 mode the 3-channel filters
    become 6-channel ones composed with that initialisation (`conv1_from_rgb`). A build_model layout (adapter keys, or
    a 6-channel first convolution) loads completely, head included. Into a group-norm model only the norms' affine
    parameters load (BN running statistics have no GroupNorm counterpart, as with Opacus' ModuleValidator.fix).
    Keys of an older layout of the architecture are renamed first (Layout.legacy_key). Anything else is a
    SpineFedError.
    """
    net = unwrap(model)
    if not isinstance(net, SpineNet):
        raise TypeError("load_pretrained expects a model from build_model")
    if input_mode is not None and input_mode != net.input_mode:
        raise ValueError(f"input_mode {input_mode!r} does not match the model's {net.input_mode!r}")
    layout = net.layout
    sd = _read_state_dict(path)
    if layout.legacy_key is not None:
        sd = {layout.legacy_key(k): v for k, v in sd.items()}
    name = Path(path).name
    first = f"{layout.first_conv}.weight"
    if first not in sd:
        raise SpineFedError(f"pretrained weights {name}: not a {net.arch} state dict (no {first})")
    in_ch = sd[first].shape[1]
    if in_ch not in (3, 6):
        raise SpineFedError(
            f"pretrained weights {name}: {layout.first_conv} takes {in_ch} channels; expected 3 (torchvision) or 6"
        )
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
        if torchvision_layout and under(key, (layout.head, "adapter")):
            continue  # head re-initialised, adapter keeps its fixed initialisation
        if key not in sd:
            missing.append(key)
            continue
        src = sd[key]
        if key == first and net.input_mode == "conv1" and src.shape[1] == 3:
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
    known = set(target) | {k for k in sd if under(k, (layout.head,))}  # any head size is accepted and ignored
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
    """Set requires_grad by trainable group and put the frozen modules (and their BN) in eval mode.

    SpineNet.train() re-applies the eval part by itself; calling this again after `train()` is harmless.
    """
    net = unwrap(model)
    paths = net.layout.trainable_paths(trainable)
    for name, param in net.named_parameters():
        param.requires_grad_(under(name, paths))
    net.trainable = trainable
    for _, child in frozen_submodules(net, paths):
        child.eval()


def exchange_keys(model: nn.Module, trainable: str) -> list[str]:
    """State-dict keys that travel, in state-dict order: the trainable parameters and the trainable part's BN buffers.
    An alias of a group (e.g. `layer4+head`) gives the same keys in the same order."""
    net = unwrap(model)
    paths = net.layout.trainable_paths(trainable)
    return [k for k in net.state_dict() if under(k, paths)]


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
