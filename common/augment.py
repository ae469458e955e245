"""Training augmentation for 6-channel sagittal stacks, batched so it runs on the training device.

What respects sagittal anatomy: one geometric transform per stack, shared by all six channels (they are co-registered
slices), small rotation (±10°), scale (±10%) and shift; per-channel intensity jitter (gamma, contrast, brightness), as
sites' scanners and protocols differ in contrast; and, with probability 0.5, swapping the −1 and +1 neighbours of both
sequences at once, which is the patient's left–right mirror image (the neighbours are ordered along that axis).

What is never done: a left–right flip of the image, which on a sagittal slice swaps anterior and posterior (the
posterior border's convexity and the posterior elements are diagnostic), nor an up–down flip (superior/inferior).
Random numbers come from a CPU generator the caller seeds, so results do not depend on the device; `draw_params` draws
them ahead (a whole epoch at a time in training) and `apply_params` runs on the device, batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Channel order T1[-1], T1[0], T1[+1], T2[-1], T2[0], T2[+1]: mirroring the patient swaps -1 and +1 in both sequences.
MIRROR_CHANNELS = [2, 1, 0, 5, 4, 3]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; defaults are deliberately small (the crop is centred on the lesion)."""

    rotate_deg: float = 10.0
    scale: float = 0.10
    shift: float = 0.06  # fraction of the image side
    gamma: float = 0.2  # log-uniform in [1/(1+g), 1+g]
    contrast: float = 0.10
    brightness: float = 0.10  # in units of the channel's standard deviation
    mirror_p: float = 0.5


def _uniform(n: int, half_width: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * half_width


def draw_params(n: int, c: int, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> Tensor:
    """The random parameters of n stacks of c channels, packed as float32 rows (n, 6 + 3c + 1) on the CPU:
    theta (2×3, affine_grid's output→input map), gamma (c), contrast (c), brightness (c), mirror (1.0 or 0.0).

    Packed so that a whole epoch's parameters travel to the device in one copy. Drawn in the same order, from the
    same CPU generator, as one batch always was: a seed gives the same augmentation on any device, and calling this
    batch after batch gives the same numbers as calling it once per training step.
    """
    angle = _uniform(n, math.radians(cfg.rotate_deg), generator)
    scale = 1 + _uniform(n, cfg.scale, generator)
    shift = _uniform(2 * n, cfg.shift * 2, generator).view(n, 2)  # normalised coordinates span 2
    log_gamma = _uniform(n * c, math.log1p(cfg.gamma), generator).view(n, c)
    contrast = 1 + _uniform(n * c, cfg.contrast, generator).view(n, c)
    bright = _uniform(n * c, cfg.brightness, generator).view(n, c)
    mirror = torch.rand(n, generator=generator) < cfg.mirror_p
    # affine_grid maps output to input coordinates: the inverse of "rotate by angle, scale by s", plus a shift.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    # Each part is rounded to float32 as it always was (in float64 first, so the values are exactly the old ones).
    parts = [theta.reshape(n, 6), torch.exp(log_gamma), contrast, bright, mirror[:, None].double()]
    return torch.cat([p.float() for p in parts], 1)


def apply_params(x: Tensor, params: Tensor, mirror_any: bool | None = None) -> Tensor:
    """Transform a batch (N, C, H, W) by packed parameters (N, 6 + 3C + 1) on x's device; a new tensor, x's dtype.

    mirror_any: whether any row mirrors, when the caller knows it without asking the device (None: unknown, the
    channel swap is always computed; the result is the same, only a CPU batch that mirrors nothing saves the copy).
    """
    n, c = x.shape[:2]
    if n == 0:
        return x
    theta = params[:, :6].reshape(n, 2, 3)
    g = params[:, 6 : 6 + c, None, None]
    contrast = params[:, 6 + c : 6 + 2 * c, None, None]
    bright = params[:, 6 + 2 * c : 6 + 3 * c, None, None]
    xf = x.float()
    if mirror_any is None or mirror_any:
        mirror = params[:, 6 + 3 * c] > 0.5
        # Reversing each sequence's three slices is MIRROR_CHANNELS, without an index tensor made on the host.
        swapped = xf.unflatten(1, (2, c // 2)).flip(2).flatten(1, 2)
        xf = torch.where(mirror[:, None, None, None], swapped, xf)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    # "border" rather than zeros: stacks are normalised per channel, so 0 is a mid-grey that looks like tissue.
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Gamma on each channel's own [min, max] range, then contrast/brightness around the channel's mean.
    lo = out.amin(dim=(2, 3), keepdim=True)
    hi = out.amax(dim=(2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    out = lo + span * ((out - lo) / span).clamp(0, 1).pow(g)
    mean = out.mean(dim=(2, 3), keepdim=True)
    std = out.std(dim=(2, 3), keepdim=True)
    out = mean + (out - mean) * contrast + bright * std
    return out.to(x.dtype)


def augment_batch(x: Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> Tensor:
    """Randomly transform a batch (N, 6, H, W); returns a new tensor on x's device and dtype."""
    n, c = x.shape[:2]
    if n == 0:
        return x
    params = draw_params(n, c, generator, cfg)
    mirror_any = bool((params[:, 6 + 3 * c] > 0.5).any())  # a CPU tensor: no device sync
    return apply_params(x, params.to(x.device), mirror_any)
