"""Reconstruction metrics on images in [0, 1].

PSNR is computed here (its definition is unambiguous); SSIM comes from torchmetrics (Gaussian window
11, sigma 1.5, the Wang et al. constants), the implementation most published VAE tables are produced
with. Both run over bands of rows, so a metric on a 4096² image costs a few hundred MB rather than
the ~20 full-image temporaries torchmetrics' SSIM makes at once; the bands give the same values.
"""

from __future__ import annotations

import torch


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 8-bit grid and return them in [0, 1].

    Metrics are computed on what a user actually gets when the reconstruction is saved as 8-bit
    PNG, so reconstructions are quantized before comparison.

    Args:
        images: (B,C,H,W) in [-1, 1] (values outside are clamped).

    Returns:
        (B,C,H,W) float32 in [0, 1], multiples of 1/255.
    """
    out = images.float().clamp(-1, 1)  # a fresh tensor: the rest is in place (one full-size copy in all)
    return out.add_(1).mul_(127.5).round_().div_(255.0)


BAND_PIXELS = 1 << 19  # pixels per band of rows for the metrics (bounds their working memory)
SSIM_HALO = 5  # rows each side of a band that the 11-tap Gaussian window reads


def _band_rows(width: int) -> int:
    return max(16, BAND_PIXELS // max(width, 1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image.

    Args:
        a, b: (B,C,H,W) in [0, 1], any channel count (MSE over all channels).

    Returns:
        (B,) PSNR in dB (``inf`` for identical images).
    """
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    step = _band_rows(a.shape[-1])
    for y in range(0, a.shape[-2], step):
        diff = a[..., y:y + step, :].double() - b[..., y:y + step, :].double()
        total += diff.square_().flatten(1).sum(1)
    mse = total / a[0].numel()
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (mean over all channels, e.g. RGB or RGBA, and the image).

    Args:
        a, b: (B,C,H,W) in [0, 1]; each side must be at least 11 pixels (the window).

    Returns:
        (B,) SSIM in [-1, 1].
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(a.shape[-2:]) < 11:  # the Gaussian window does not fit; SSIM is undefined
        return torch.full((a.shape[0],), float("nan"))
    height = a.shape[-2]
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    step = _band_rows(a.shape[-1])
    # SSIM map row y reads image rows y-5..y+5 (reflected at the image's edges, which torchmetrics'
    # own padding reproduces at a band's edge only where that is the image's edge): each band is run
    # with a 5-row halo, and only its own rows of the map are kept.
    for y0 in range(0, height, step):
        y1 = min(y0 + step, height)
        top, bottom = max(y0 - SSIM_HALO, 0), min(y1 + SSIM_HALO, height)
        _, ssim_map = structural_similarity_index_measure(
            a[..., top:bottom, :].float(), b[..., top:bottom, :].float(), data_range=1.0, reduction="none",
            return_full_image=True)
        total += ssim_map[..., y0 - top:y1 - top, :].double().flatten(1).sum(1)
    return (total / a[0].numel()).float()
