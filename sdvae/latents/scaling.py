"""Scaling latents into and out of the diffusion space, exactly as diffusers pipelines do."""

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
