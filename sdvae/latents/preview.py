"""Decoder-free latent previews: a fixed linear map of latent channels to RGB."""

from __future__ import annotations

import torch

# Linear map from scaled (diffusion-space) SD-style 4-channel latents to RGB in about [-1, 1]: the
# coefficients widely used for SD 1.x/2.x live previews (e.g. ComfyUI's ``latent_rgb_factors``).
# Rows: latent channels; columns: R, G, B.
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_rgb_matrix(channels: int) -> torch.Tensor:
    """The fixed (C,3) matrix :func:`latent_preview` uses.

    4 channels: :data:`SD_LATENT_RGB`. Any other count (no published map fits every model): channel c
    feeds colour c mod 3 with weight 0.5/sqrt(n), n being the number of channels feeding that colour,
    so unit-variance channels give colours with standard deviation 0.5 (±2σ fits [-1, 1]).
    """
    if channels == 4:
        return torch.tensor(SD_LATENT_RGB, dtype=torch.float32)
    matrix = torch.zeros(channels, 3)
    for c in range(channels):
        matrix[c, c % 3] = 1.0
    return matrix * 0.5 / matrix.sum(0).clamp(min=1).sqrt()


def latent_preview(z: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """A quick look at latents without the decoder: a fixed linear map of channels to RGB.

    Args:
        z: (C,h,w) or (B,C,h,w) *scaled* latents (see :func:`scale_latents`).
        upscale: nearest-neighbour enlargement (e.g. the VAE's downsampling factor).

    Returns:
        (B,3,h·upscale,w·upscale) float32 in [0, 1] (B=1 for a single latent).
    """
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4:
        raise ValueError(f"latent_preview expects (C,h,w) or (B,C,h,w), got {tuple(z.shape)}")
    rgb = torch.einsum("bchw,ck->bkhw", z.float(), latent_rgb_matrix(z.shape[1]).to(z.device))
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, -2).repeat_interleave(upscale, -1)
    return rgb
