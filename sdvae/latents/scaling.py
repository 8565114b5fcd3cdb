"""Scaling latents into and out of the diffusion space, exactly as each family's diffusers pipeline does.

One rule for every VAE family (scaled latent shape for an H×W image, f the downsampling factor):

* SD 1.x/2.x, SDXL: ``z * scaling_factor``; SD3, FLUX.1: ``(z - shift_factor) * scaling_factor``;
  with per-channel ``latents_mean``/``latents_std`` set: ``(z - latents_mean) * scaling_factor /
  latents_std``. Shape (C, H/f, W/f), as the VAE's own latents.
* FLUX.2 (``AutoencoderKLFlux2``): the 2×2 patchify of ``Flux2Pipeline._patchify_latents`` to 4C
  channels, then ``(z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)`` with the VAE's own
  BatchNorm running statistics. Shape (4C, H/2f, W/2f): (128, H/16, W/16) for FLUX.2's 32 channels.

The statistics of FLUX.2 live in the weights, not the config, so the rule takes a *normalisation
source*: a model (``vae``), a mapping (``vae.config`` for every family but FLUX.2, or what
:func:`latent_normalization` returns: a small JSON-able dict that ``encode-dataset`` records so
:class:`~sdvae.latents.dataset.LatentDataset` scales without loading the model), or a diffusers
folder (its BatchNorm buffers are read from the weights file, nothing else).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdvae.errors import UserError
from sdvae.model.family import is_flux2

# The keys of a normalisation mapping (what :func:`latent_normalization` returns).
AFFINE_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
FLUX2_NORM_KEYS = ("patch_size", "batch_norm_eps", "bn_running_mean", "bn_running_var")

Source = Mapping[str, Any] | torch.nn.Module | str | os.PathLike[str]


def _folder_bn(path: Path) -> dict[str, Any]:
    """A diffusers folder's config.json plus its BatchNorm statistics (read from the weights file alone)."""
    from safetensors import safe_open

    folder = path.parent if path.name == "config.json" else path
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise UserError(f"{path}: no config.json to take the latent normalisation from")
    config = json.loads((folder / "config.json").read_text())
    if not is_flux2(config):
        return config
    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            mean, var = f.get_tensor("bn.running_mean"), f.get_tensor("bn.running_var")
    except Exception as err:  # missing file, missing tensor, damaged file: all mean "no statistics here"
        raise UserError(f"{weights}: no FLUX.2 BatchNorm statistics (bn.running_mean/bn.running_var) to "
                        f"normalise with ({str(err).splitlines()[0][:120]})") from None
    return {**config, "bn_running_mean": mean.float().tolist(), "bn_running_var": var.float().tolist()}


def latent_normalization(source: Source) -> dict[str, Any]:
    """The latent normalisation of a model, folder or config, as a plain JSON-able dict.

    For AutoencoderKL families: ``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``.
    For FLUX.2: ``family: flux2``, ``patch_size``, ``batch_norm_eps`` and the BatchNorm's
    ``bn_running_mean``/``bn_running_var`` (4C floats each).

    Raises:
        UserError: a FLUX.2 config without the BatchNorm statistics (pass the model or its folder).
    """
    if isinstance(source, (str, os.PathLike)):
        source = _folder_bn(Path(source))
    if isinstance(source, torch.nn.Module):
        config: Mapping[str, Any] = source.config  # type: ignore[assignment]
        if is_flux2(config):
            bn = source.bn  # type: ignore[attr-defined]
            config = {**config, "bn_running_mean": bn.running_mean.float().tolist(),
                      "bn_running_var": bn.running_var.float().tolist()}
        source = config
    if is_flux2(source) or source.get("family") == "flux2":
        if source.get("bn_running_mean") is None or source.get("bn_running_var") is None:
            raise UserError("FLUX.2 latents are normalised with the VAE's BatchNorm statistics, which are in its "
                            "weights, not its config: pass the model, its folder or latent_normalization(vae)")
        patch = [int(p) for p in (source.get("patch_size") or [2, 2])]
        if patch != [2, 2]:
            raise UserError(f"FLUX.2 patch_size {patch} is not supported (the FLUX.2 pipeline patchifies 2x2)")
        return {"family": "flux2", "patch_size": patch, "batch_norm_eps": float(source.get("batch_norm_eps", 1e-4)),
                "bn_running_mean": [float(v) for v in source["bn_running_mean"]],
                "bn_running_var": [float(v) for v in source["bn_running_var"]]}
    return {k: source.get(k) for k in AFFINE_KEYS}


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w) → (B,4C,h/2,w/2), the 2×2 patchify of ``Flux2Pipeline._patchify_latents``."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise UserError(f"FLUX.2 latents of {h}x{w} cannot be patchified 2x2: latent sides must be even "
                        "(image sides multiples of 16)")
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """(B,4C,h,w) → (B,C,2h,2w), the inverse of :func:`patchify` (``Flux2Pipeline._unpatchify_latents``)."""
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _bn(norm: Mapping[str, Any], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's (mean, std) as (1,4C,1,1) in z's dtype, computed as the pipeline does (float32, then cast)."""
    mean = torch.tensor(norm["bn_running_mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.sqrt(torch.tensor(norm["bn_running_var"], dtype=torch.float32).view(1, -1, 1, 1)
                     + norm["batch_norm_eps"])
    return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)


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


def scale_latents(z: torch.Tensor, source: Source) -> torch.Tensor:
    """Map VAE latents to diffusion-model latents (the rule of the module docstring).

    Args:
        z: (B,C,h,w) unscaled latents, as the encoder produces them.
        source: the model, its config (not for FLUX.2), a :func:`latent_normalization` dict or a folder.

    Returns:
        (B,C,h,w) scaled latents, or (B,4C,h/2,w/2) for FLUX.2 (h, w must be even).
    """
    norm = latent_normalization(source)
    if norm.get("family") == "flux2":
        mean, std = _bn(norm, z)
        return (patchify(z) - mean) / std
    shift, scale = _affine(norm, z)
    return (z - shift) * scale


def unscale_latents(z: torch.Tensor, source: Source) -> torch.Tensor:
    """Inverse of :func:`scale_latents`: diffusion-space latents back to the decoder's (B,C,h,w) input."""
    norm = latent_normalization(source)
    if norm.get("family") == "flux2":
        mean, std = _bn(norm, z)
        return unpatchify(z * std + mean)
    shift, scale = _affine(norm, z)
    return z / scale + shift


def scaled_shape(shape: tuple[int, ...], source: Source | None) -> tuple[int, ...]:
    """The (C,h,w) shape :func:`scale_latents` makes of unscaled (C,h,w) latents (FLUX.2: (4C,h/2,w/2))."""
    c, h, w = shape[-3:]
    if source is None or latent_normalization(source).get("family") != "flux2":
        return (c, h, w)
    return (c * 4, h // 2, w // 2)

