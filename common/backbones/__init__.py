"""The backbone registry: every architecture the project can train, looked up by name (FLamby's lookup by name,
torchvision's builders over one private constructor).

A backbone is one module here with a builder `name(norm, input_mode) -> SpineNet` (common/backbones/base.py says
what a builder returns) plus one line in BUILDERS. Everything else (ModelConfig validation, CLI choices, the
experiment's checks, trainable groups, DP, Grad-CAM, pretrained loading) asks this module, never spells an
architecture.

This module imports no torch: the coordinator's experiment checks and the CLIs' choice lists read the names only; a
builder's module is imported when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.backbones.base import SpineNet

# name → "module:builder". The one line a new backbone adds.
BUILDERS = {
    "resnet18": "common.backbones.resnet:resnet18",
    "resnet34": "common.backbones.resnet:resnet34",
    "resnet50": "common.backbones.resnet:resnet50",
    "densenet121": "common.backbones.densenet:densenet121",
}
ARCHS = tuple(BUILDERS)
DEFAULT_ARCH = "resnet50"
INPUT_MODES = ("adapter", "conv1")  # "conv1": the backbone's own first convolution takes the 6 channels
NORMS = ("batch", "group")

# Trainable groups, the same three for every backbone: everything, the last feature stage and the head, the head.
TRAINABLE_GROUPS = ("all", "last-stage+head", "head")
# Older spellings still accepted wherever a trainable group is (experiment files, site configs, CLIs, checkpoints):
# they name the same tensors in the same order, so a configuration that used one gives the same results.
TRAINABLE_ALIASES = {"layer4+head": "last-stage+head"}
TRAINABLE = TRAINABLE_GROUPS + tuple(TRAINABLE_ALIASES)  # every accepted spelling, for choice lists and validation


def trainable_group(name: str) -> str:
    """The canonical group for a trainable spelling (an alias resolves); ValueError naming the choices otherwise."""
    if name not in TRAINABLE:
        raise ValueError(f"trainable: expected one of {', '.join(TRAINABLE)}, got {name!r}")
    return TRAINABLE_ALIASES.get(name, name)


def builder(arch: str) -> Callable[[str, str], SpineNet]:
    """The registered builder for `arch` (imports its module); ValueError naming the registered ones otherwise."""
    if arch not in BUILDERS:
        raise ValueError(f"model.arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    module, name = BUILDERS[arch].split(":")
    return getattr(import_module(module), name)
