"""Training augmentation for 6-channel sagittal stacks, batched so it runs on the training device.

What respects sagittal anatomy: one geometric transform per stack, shared by all six channels (they are co-registered
slices), small rotation (±10°), scale (±10%) and shift; per-channel intensity jitter (gamma, contrast, brightness), as
sites' scanners and protocols differ in contrast; and, with probability 0.5, swapping the −1 and +1 neighbours of both
sequences at once, which is the patient's left–right mirror image (the neighbours are ordered along that axis).

What is never done: a left–right flip of the image, which on a sagittal slice swaps anterior and posterior (the
posterior border's convexity and the posterior elements are diagnostic), nor an up–down flip (superior/inferior).
Random numbers come from a CPU generator the caller seeds, so results do not depend on the device.
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


def augment_batch(x: Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> Tensor:
    """Randomly transform a batch (N, 6, H, W); returns a new tensor on x's device and dtype."""
    n, c = x.shape[:2]
    if n == 0:
        return x
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
    theta = theta.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    if mirror.any():
        idx = mirror.to(x.device)
        xf = torch.where(idx[:, None, None, None], xf[:, MIRROR_CHANNELS], xf)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    # "border" rather than zeros: stacks are normalised per channel, so 0 is a mid-grey that looks like tissue.
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Gamma on each channel's own [min, max] range, then contrast/brightness around the channel's mean.
    lo = out.amin(dim=(2, 3), keepdim=True)
    hi = out.amax(dim=(2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    g = torch.exp(log_gamma).to(device=x.device, dtype=torch.float32)[:, :, None, None]
    out = lo + span * ((out - lo) / span).clamp(0, 1).pow(g)
    mean = out.mean(dim=(2, 3), keepdim=True)
    std = out.std(dim=(2, 3), keepdim=True)
    contrast = contrast.to(device=x.device, dtype=torch.float32)[:, :, None, None]
    bright = bright.to(device=x.device, dtype=torch.float32)[:, :, None, None]
    out = mean + (out - mean) * contrast + bright * std
    return out.to(x.dtype)
