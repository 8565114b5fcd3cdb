"""Latent scaling: the only place where latents move between the VAE's space and the diffusion space.

A diffusion model sees ``scaled`` latents; the VAE decoder takes ``unscaled`` ones. Which affine map
applies depends on the model's config and mirrors what diffusers pipelines do:

* ``latents_mean`` / ``latents_std`` set (per channel, SDXL-style pipelines):
  ``scaled = (z - mean) * scaling_factor / std``
* otherwise ``shift_factor`` (SD3, FLUX; ``None`` means 0):
  ``scaled = (z - shift_factor) * scaling_factor``
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdvae.atomic import atomic_file
from sdvae.errors import UserError


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


def write_latents_file(tensors: dict[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write latents and their metadata to one ``.safetensors`` file, atomically.

    Args:
        tensors: name -> tensor (e.g. ``"00000.mean"`` (C,h,w)).
        meta: JSON-able metadata (model reference, config hash, whether scaled, image sizes...).
            Stored as JSON under the ``"sdvae"`` key of the safetensors header, with ``format``,
            ``config_hash`` and ``scaled`` also as plain string keys for other readers.
        path: destination; written to a temporary file in the same folder, then renamed.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: latents are written as .safetensors; use that extension")
    header = {"sdvae": json.dumps(meta)}
    header.update({k: str(meta[k]).lower() if isinstance(meta[k], bool) else str(meta[k])
                   for k in ("format", "config_hash", "scaled") if k in meta})
    with atomic_file(dest) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
    return dest


def read_latents_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_latents_file`.

    Returns:
        (tensors, metadata).

    Raises:
        UserError: missing, unreadable or not a latents file; the message names the file.
    """
    from safetensors import safe_open

    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    try:
        with safe_open(str(src), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{src}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if "sdvae" not in header:
        raise UserError(f"{src}: safetensors file has no sdvae metadata (not written by `sdvae encode`)")
    return tensors, json.loads(header["sdvae"])
