"""Reconstruction metrics on images in [0, 1].

PSNR is computed here (it is one line and its definition is unambiguous); SSIM comes from
torchmetrics (Gaussian window 11, sigma 1.5, the Wang et al. constants), the implementation most
published VAE tables are produced with.
"""

from __future__ import annotations

import torch


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 8-bit grid and return them in [0, 1].

    Metrics are computed on what a user actually gets when the reconstruction is saved as 8-bit
    PNG, so reconstructions are quantized before comparison.

    Args:
        images: (B,3,H,W) in [-1, 1] (values outside are clamped).

    Returns:
        (B,3,H,W) float32 in [0, 1], multiples of 1/255.
    """
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image.

    Args:
        a, b: (B,3,H,W) in [0, 1].

    Returns:
        (B,) PSNR in dB (``inf`` for identical images).
    """
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (mean over the RGB channels and the image).

    Args:
        a, b: (B,3,H,W) in [0, 1]; each side must be at least 11 pixels (the window).

    Returns:
        (B,) SSIM in [-1, 1].
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(a.shape[-2:]) < 11:  # the Gaussian window does not fit; SSIM is undefined
        return torch.full((a.shape[0],), float("nan"))
    return structural_similarity_index_measure(
        a.float(), b.float(), data_range=1.0, reduction="none"
    ).reshape(a.shape[0])
