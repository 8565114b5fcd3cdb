"""Latent scaling: the only place where latents move between the VAE's space and the diffusion space.

A diffusion model sees ``scaled`` latents; the VAE decoder takes ``unscaled`` ones. Which affine map
applies depends on the model's config and mirrors what diffusers pipelines do:

* ``latents_mean`` / ``latents_std`` set (per channel, SDXL-style pipelines):
  ``scaled = (z - mean) * scaling_factor / std``
* otherwise ``shift_factor`` (SD3, FLUX; ``None`` means 0):
  ``scaled = (z - shift_factor) * scaling_factor``
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _affine(config: Mapping[str, Any], z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Return (shift, scale) such that ``scaled = (z - shift) * scale``, broadcastable to z (B,C,h,w)."""
    scaling = float(config.get("scaling_factor", 1.0) or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        std_t = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return mean_t, scaling / std_t
    shift = config.get("shift_factor")
    return float(shift or 0.0), scaling


def scale_latents(z: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Map VAE latents to diffusion-model latents.

    Args:
        z: (B,C,h,w) unscaled latents, as the encoder produces them.
        config: the VAE's config (``vae.config`` or a dict with the same keys).

    Returns:
        (B,C,h,w) scaled latents (roughly unit variance for a well-chosen scaling factor).
    """
    shift, scale = _affine(config, z)
    return (z - shift) * scale


def unscale_latents(z: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of :func:`scale_latents`: diffusion-space latents (B,C,h,w) back to the decoder's input."""
    shift, scale = _affine(config, z)
    return z / scale + shift
