"""Decoder-free latent previews: a linear map of latent channels (plus a bias) to RGB.

Which map ``sdvae decode --preview`` uses (:func:`preview_rgb_map`), in order:

1. the map fitted when the dataset was encoded (``preview_rgb`` in ``sdvae_latents.json``): least squares
   of the input pixels' RGB view (:func:`sdvae.images.channels.rgb_view`: a grayscale model's pixels repeated
   to grey RGB, an RGBA model's colour channels without alpha), area-averaged to latent resolution, on the
   posterior means and a bias (:func:`rgb_fit_sums`, :func:`solve_rgb_map`);
2. SD 1.x/2.x's published coefficients (:data:`SD_LATENT_RGB`), for models in SD 1.x/2.x's latent
   space only (:func:`is_sd_latent_space`);
3. otherwise an arbitrary channel→colour map (:func:`channel_rgb_matrix`), with a note saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from sdvae.model.family import is_flux2

# Linear map from scaled (diffusion-space) SD-style 4-channel latents to RGB in about [-1, 1]: the
# coefficients widely used for SD 1.x/2.x live previews (e.g. ComfyUI's ``latent_rgb_factors``).
# Rows: latent channels; columns: R, G, B.
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
# The architecture keys (and their defaults when a config omits them) that must equal the `sd` preset's for
# SD_LATENT_RGB to apply; sample_size, force_upcast and the like do not change the latent space.
_SD_ARCH_DEFAULTS = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
_SD_ARCH_KEYS = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
                 "act_fn", "in_channels", "out_channels", "latent_channels")
SD_SCALING_FACTOR = 0.18215


class RgbMap(NamedTuple):
    """rgb = z·weight + bias, z the *unscaled* latents, rgb in about [-1, 1]; ``source``: fitted, sd or arbitrary."""

    weight: torch.Tensor  # (C,3) float32
    bias: torch.Tensor  # (3,) float32
    source: str


def channel_rgb_matrix(channels: int) -> torch.Tensor:
    """The arbitrary (C,3) map: channel c feeds colour c mod 3 with weight 0.5/sqrt(n), n being the number of
    channels feeding that colour, so unit-variance channels give colours with standard deviation 0.5."""
    matrix = torch.zeros(channels, 3)
    for c in range(channels):
        matrix[c, c % 3] = 1.0
    return matrix * 0.5 / matrix.sum(0).clamp(min=1).sqrt()


def latent_rgb_matrix(channels: int) -> torch.Tensor:
    """The fixed (C,3) matrix :func:`latent_preview` uses without a map: :data:`SD_LATENT_RGB` for 4 channels
    (right for SD 1.x/2.x latents only), :func:`channel_rgb_matrix` for any other count."""
    if channels == 4:
        return torch.tensor(SD_LATENT_RGB, dtype=torch.float32)
    return channel_rgb_matrix(channels)


def is_sd_latent_space(config: Mapping[str, Any]) -> bool:
    """Whether a VAE config is SD 1.x/2.x's latent space, where :data:`SD_LATENT_RGB` applies.

    The rule: the `sd` preset's architecture (block types and widths, layers per block, norm groups,
    activation, 3 → 4 → 3 channels, both quant convs, mid-block attention) and SD 1.x/2.x's scaling
    (``scaling_factor`` 0.18215, no shift, no per-channel mean/std). SDXL's VAE shares the architecture
    but was retrained (scaling 0.13025): its latents need other coefficients, so it does not qualify.
    Identical architecture with other weights cannot be told apart; a fitted map (encode-dataset) wins.
    """
    from sdvae.model.presets import PRESETS

    sd = PRESETS["sd"].config
    if any(config.get(k) != sd[k] for k in _SD_ARCH_KEYS):
        return False
    if any(config.get(k, default) != default for k, default in _SD_ARCH_DEFAULTS.items()):
        return False
    return (config.get("scaling_factor") == SD_SCALING_FACTOR and not config.get("shift_factor")
            and config.get("latents_mean") is None and config.get("latents_std") is None)


def _unscaled(weight: torch.Tensor, config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A map of scaled latents as a map of unscaled ones (the scaling is affine per channel)."""
    from sdvae.latents.scaling import scale_latents

    channels = weight.shape[0]
    offset = scale_latents(torch.zeros(1, channels, 1, 1), config).reshape(channels)
    gain = scale_latents(torch.ones(1, channels, 1, 1), config).reshape(channels) - offset
    return gain[:, None] * weight, offset @ weight


def preview_rgb_map(config: Mapping[str, Any], fitted: Mapping[str, Any] | None = None) -> RgbMap:
    """The map ``decode --preview`` uses for a model's unscaled latents (see the module docstring).

    Args:
        config: the VAE's config (with its scaling keys).
        fitted: ``{"weight": (C,3) lists, "bias": [3]}`` from a dataset's metadata, or None.
    """
    if fitted:
        return RgbMap(torch.tensor(fitted["weight"], dtype=torch.float32),
                      torch.tensor(fitted["bias"], dtype=torch.float32), "fitted")
    channels = int(config["latent_channels"])
    if is_flux2(config):  # its normalisation is per 2x2 patch position, not per channel: map the VAE's latents
        return RgbMap(channel_rgb_matrix(channels), torch.zeros(3), "arbitrary")
    if is_sd_latent_space(config):
        return RgbMap(*_unscaled(torch.tensor(SD_LATENT_RGB, dtype=torch.float32), config), "sd")
    return RgbMap(*_unscaled(channel_rgb_matrix(channels), config), "arbitrary")


def rgb_fit_sums(latents: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal-equation sums of a least-squares fit of pixels on latents: X'X and X'Y, float64.

    X is one row [z_1 … z_C, 1] per latent cell, Y the RGB of that cell's pixels area-averaged to latent
    resolution. Sums over batches add up; :func:`solve_rgb_map` solves them.

    Args:
        latents: (B,C,h,w) unscaled latents (e.g. posterior means).
        pixels: (B,C,H,W) the encoded pixels in [-1, 1] (C 1, 3 or 4: fitted on their RGB view), H = h·f and
            W = w·f.

    Returns:
        ((C+1,C+1), (C+1,3)) float64 tensors on the CPU.
    """
    import numpy as np

    from sdvae.images.channels import rgb_view

    # numpy's einsum (without optimize) and reductions run on one thread in a fixed order, so the sums do
    # not depend on the thread count of the process (ranks under torchrun run with 1): resumes stay exact.
    lat = latents.detach().to("cpu", torch.float64).numpy()
    pix = rgb_view(pixels.detach()).to("cpu", torch.float64).numpy()
    b, c, h, w = lat.shape
    fh, fw = pix.shape[-2] // h, pix.shape[-1] // w
    if pix.shape[-2:] != (h * fh, w * fw):
        raise ValueError(f"pixels {pix.shape[-2:]} are not a multiple of the latents' {h}x{w}")
    rgb = pix.reshape(b, 3, h, fh, w, fw).mean(axis=(3, 5))
    x = np.concatenate([lat, np.ones((b, 1, h, w))], 1).transpose(0, 2, 3, 1).reshape(-1, c + 1)
    y = rgb.transpose(0, 2, 3, 1).reshape(-1, 3)
    xtx = np.einsum("ni,nj->ij", x, x, optimize=False)
    xty = np.einsum("ni,nj->ij", x, y, optimize=False)
    return torch.from_numpy(xtx), torch.from_numpy(xty)


def solve_rgb_map(xtx: torch.Tensor, xty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (weight (C,3), bias (3,)) from :func:`rgb_fit_sums` totals (minimum norm if singular)."""
    solution = torch.linalg.pinv(xtx.double(), hermitian=True) @ xty.double()
    return solution[:-1].float(), solution[-1].float()


def latent_preview(z: torch.Tensor, upscale: int = 1, rgb_map: RgbMap | None = None) -> torch.Tensor:
    """A quick look at latents without the decoder: a linear map of channels to RGB.

    Args:
        z: (C,h,w) or (B,C,h,w) latents: *unscaled* with ``rgb_map`` (see :func:`preview_rgb_map`); without
            it, *scaled* latents (see :func:`scale_latents`) mapped by :func:`latent_rgb_matrix`.
        upscale: nearest-neighbour enlargement (e.g. the VAE's downsampling factor).
        rgb_map: the map to apply (None: :func:`latent_rgb_matrix`, no bias).

    Returns:
        (B,3,h·upscale,w·upscale) float32 in [0, 1] (B=1 for a single latent).
    """
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4:
        raise ValueError(f"latent_preview expects (C,h,w) or (B,C,h,w), got {tuple(z.shape)}")
    weight = latent_rgb_matrix(z.shape[1]) if rgb_map is None else rgb_map.weight
    if weight.shape != (z.shape[1], 3):
        raise ValueError(f"the preview map is for {weight.shape[0]} channels, the latents have {z.shape[1]}")
    rgb = torch.einsum("bchw,ck->bkhw", z.float(), weight.to(z.device))
    if rgb_map is not None:
        rgb = rgb + rgb_map.bias.to(z.device)[None, :, None, None]
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, -2).repeat_interleave(upscale, -1)
    return rgb
