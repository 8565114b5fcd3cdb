"""Resizing and cropping image tensors: the one implementation every area uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Augmentation and datasets
# --------------------------------------------------------------------------------------------------


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is exactly ``size`` (aspect kept), antialiased bicubic.

    Args:
        image: (3,H,W) float in [-1,1].
        size: target shorter side in pixels.

    Returns:
        (3,H',W') float32 in [-1,1] with ``min(H',W') == size`` (input returned as is if already so).
    """
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    if h <= w:
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    # Antialias matters when shrinking (aliasing would teach the VAE moiré); bicubic overshoots, so clamp.
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(-1, 1)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3,H,W) → (3,size,size) from the middle (H,W >= size)."""
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


def fit_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an image to cover (H, W) with its aspect kept (antialiased bicubic), then center-crop to (H, W).

    Args:
        image: (1,3,h,w) in [-1, 1].
        size: (H, W) target.

    Returns:
        (1,3,H,W) in [-1, 1] (clamped: bicubic overshoots).
    """
    import torch.nn.functional as F

    height, width = size
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-9)), max(width, math.ceil(w * scale - 1e-9))
    out = F.interpolate(image.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return out[..., top:top + height, left:left + width].clamp(-1, 1)
