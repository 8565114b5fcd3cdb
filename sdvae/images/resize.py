"""Resizing and cropping image tensors: the one implementation every area uses.

Every resize is antialiased bicubic (aliasing would teach a VAE moiré and bias metrics), computed in
fp32 and clamped to [-1, 1] because bicubic overshoots.
"""

from __future__ import annotations

import math

import torch


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (…,C,H,W) in [-1,1] to exactly ``size`` = (H', W'); float32, clamped to [-1,1]."""
    import torch.nn.functional as F

    batched = image if image.dim() == 4 else image[None]
    out = F.interpolate(batched.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    out = out.clamp_(-1, 1)
    return out if image.dim() == 4 else out[0]


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is exactly ``size``, aspect kept.

    Args:
        image: (C,H,W) float in [-1,1].
        size: target shorter side in pixels.

    Returns:
        (C,H',W') float32 in [-1,1] with ``min(H',W') == size`` (input returned as is if already so).
    """
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    if h <= w:
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    return resize_to(image, (nh, nw))


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (H', W') with the aspect of (height, width) that covers ``target`` = (H, W)."""
    th, tw = target
    scale = max(th / height, tw / width)
    return max(th, math.ceil(height * scale - 1e-9)), max(tw, math.ceil(width * scale - 1e-9))


def center_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centered ``crop`` = (h, w) inside a height×width image."""
    return (height - crop[0]) // 2, (width - crop[1]) // 2


def crop_offsets(height: int, width: int, crop: tuple[int, int], *, random: bool = False,
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """(top, left) of a ``crop`` = (h, w) inside a height×width image: centered, or uniform from ``generator``."""
    if not random:
        return center_offsets(height, width, crop)
    top = int(torch.randint(height - crop[0] + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop[1] + 1, (1,), generator=generator))
    return top, left


def center_crop(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(…,H,W) → (…,h,w) from the middle, ``size`` = side or (h, w) with h ≤ H, w ≤ W."""
    ch, cw = (size, size) if isinstance(size, int) else size
    top, left = center_offsets(*image.shape[-2:], (ch, cw))
    return image[..., top:top + ch, left:left + cw]


def fit_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` = (H, W) with the aspect kept, then center-crop to exactly (H, W).

    Args:
        image: (1,C,h,w) or (C,h,w) in [-1, 1].
        size: (H, W) target.

    Returns:
        The same rank, (…,C,H,W) in [-1, 1].
    """
    return center_crop(resize_to(image, cover_size(*image.shape[-2:], size)), size)
