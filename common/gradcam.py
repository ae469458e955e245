"""Grad-CAM (Selvaraju et al. 2017) for the one-logit SpineNet, and its overlay on the T1W/T2W lesion slices.

Torch hooks rather than a library: the method is a few lines here, and the candidates cost more than they give —
`grad-cam` pulls opencv-python and ttach into every hospital install; captum's LayerGradCam computes the same thing
but we would still write the layer lookup, the one-logit target and the overlay. The target layer is named by its
dotted module path in the backbone (default: the backbone's Layout.gradcam_layer, its last spatial feature map:
`layer4.2` for ResNet50, `features.norm5` for DenseNet-121); the model's forward runs the 6→3 adapter first, so any
backbone layer sees the adapted input and the map is in the stack's geometry.

The network has one "malignant" logit z. The map for "malignant" weighs the layer's channels by the spatial mean of
dz/dA; for "benign" by that of d(−z)/dA; ReLU keeps the evidence for the target class. Maps are upsampled bilinearly
to the stack's size and scaled to [0, 1] (all zero when no location supports the target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import SpineFedError
from common.model import unwrap

log = logging.getLogger(__name__)

TARGETS = ("malignant", "benign", "call")
PANEL_PX = 448  # ≥ 384 px per panel: readable on a reading-room screen, small enough for a report


@dataclass(frozen=True)
class CamResult:
    cam: np.ndarray  # (S, S) float32 in [0, 1], the stack's grid
    raw: np.ndarray  # (h, w) at the layer's resolution, before upsampling and scaling (ReLU applied)
    layer: str
    target: str  # malignant | benign
    probability: float  # P(malignant) from the same forward pass


def default_layer(model: nn.Module) -> str:
    """The backbone's own choice (e.g. `layer4.2` for ResNet50, `layer4.1` for ResNet18, `features.norm5` for
    DenseNet-121)."""
    return unwrap(model).layout.gradcam_layer


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The backbone module at dotted path `name`; a SpineFedError listing valid names when there is none."""
    net = unwrap(model)
    try:
        return net.get_submodule(name)
    except AttributeError:
        layout = net.layout
        last = layout.stages[-1]
        blocks = [f"{last}.{n}" for n, _ in net.get_submodule(last).named_children()][-3:]
        raise SpineFedError(
            f"Grad-CAM layer {name!r} is not in the model; e.g. {layout.gradcam_layer}, one of the stages "
            f"{', '.join(layout.stages)}, or a block of the last: {', '.join(blocks)}"
        ) from None


def gradcam(
    model: nn.Module,
    stack: np.ndarray | Tensor,
    layer: str | None = None,
    target: str = "call",
    threshold: float = 0.5,
) -> CamResult:
    """Grad-CAM of one (6, S, S) stack at backbone `layer` (default `default_layer`) for `target`: 'malignant',
    'benign', or 'call' (the class the model calls at `threshold`). Weights and train/eval mode are left as found."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    net = unwrap(model)
    layer = layer or default_layer(net)
    module = resolve_layer(net, layer)
    x = torch.as_tensor(np.asarray(stack, dtype=np.float32) if not isinstance(stack, Tensor) else stack).float()
    if x.ndim != 3 or x.shape[0] != 6:
        raise ValueError(f"stack: expected shape (6, S, S), got {tuple(x.shape)}")
    device = next(net.parameters()).device
    x = x[None].to(device)
    saved: dict[str, Tensor] = {}

    def keep(_module, _inputs, output):
        # retain_grad on the activation itself: works whether or not the layer's parameters require grad
        # (a frozen backbone in `head` mode still passes gradients through).
        output.retain_grad()
        saved["act"] = output

    was_training = net.training
    net.eval()
    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x.requires_grad_(True)  # gradients must flow even when every parameter is frozen
            logit = net(x)[0]
            if "act" not in saved:
                raise SpineFedError(f"Grad-CAM layer {layer!r} is not used in the forward pass")
            p = float(torch.sigmoid(logit.detach()).cpu())
            tgt = target if target != "call" else ("malignant" if p >= threshold else "benign")
            score = logit if tgt == "malignant" else -logit
            net.zero_grad(set_to_none=True)
            score.backward()
        act, grad = saved["act"].detach()[0], saved["act"].grad.detach()[0]
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)
        if was_training:
            net.train()
    if act.ndim != 3:
        raise SpineFedError(f"Grad-CAM layer {layer!r} has no spatial output (shape {tuple(act.shape)})")
    weights = grad.mean(dim=(1, 2))
    raw = torch.relu((weights[:, None, None] * act).sum(0)).float()
    size = x.shape[-2:]
    up = F.interpolate(raw[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    peak = float(up.max())
    cam = (up / peak) if peak > 0 else torch.zeros_like(up)
    return CamResult(cam.cpu().numpy().astype(np.float32), raw.cpu().numpy(), layer, tgt, p)


def _panel(image: np.ndarray, px: int) -> np.ndarray:
    """A stack channel → display grey values [0, 1] (robust window) upsampled to px × px."""
    lo, hi = np.percentile(image, [1, 99])
    g = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    t = torch.from_numpy(g.astype(np.float32))[None, None]
    return F.interpolate(t, size=(px, px), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def save_overlay(
    path: str | Path,
    stack: np.ndarray,
    cam: CamResult,
    box: tuple[float, float, float, float] | None,
    *,
    title: str = "",
    footer: str = "",
    panel_px: int = PANEL_PX,
) -> Path:
    """PNG with four panels: T1W and T2W lesion slices (channels 1 and 4), each plain and with the Grad-CAM overlay,
    the box drawn on all. Orientation is the canonical sagittal grid: anterior left, superior up."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    size = stack.shape[-1]
    scale = panel_px / size
    cam_px = F.interpolate(torch.from_numpy(cam.cam)[None, None], size=(panel_px, panel_px), mode="bilinear")[0, 0]
    dpi = 100
    fig, axes = plt.subplots(2, 2, figsize=(2 * panel_px / dpi + 0.4, 2 * panel_px / dpi + 2.0), dpi=dpi)
    for row, (ch, name) in enumerate(((1, "T1W lesion slice"), (4, "T2W lesion slice"))):
        grey = _panel(stack[ch], panel_px)
        for col in range(2):
            ax = axes[row, col]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if col == 1:
                ax.imshow(cam_px.numpy(), cmap="jet", alpha=0.4 * (cam_px.numpy() > 0.05), vmin=0, vmax=1)
            if box is not None:
                x0, y0, x1, y1 = (v * scale for v in box)
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.2))
            ax.set_title(f"{name}" + (f" + Grad-CAM ({cam.target}, {cam.layer})" if col == 1 else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 1:
                ax.set_xlabel("anterior  ←  →  posterior   (superior up)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if footer:
        fig.text(0.5, 0.005, footer, ha="center", va="bottom", fontsize=8)
    # Explicit spacing: tight_layout lets the lower row's titles touch the upper panels.
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.07, wspace=0.03, hspace=0.14)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
