"""The latent space as a generative model: decode prior samples, walk between two images' posteriors.

Two spaces matter (see :mod:`sdvae.latents.format`):

* the VAE's own latents z, on which the KL term of training puts the prior N(0, I). SD-style VAEs are
  trained with a tiny KL weight, so their posteriors sit far from that prior (SD's latents have a
  standard deviation of about 1/0.18215 ≈ 5.5): decoding N(0, I) samples there gives flat, washed-out
  images.
* the *scaled* latents a diffusion model works in, ``scale_latents(z)``, chosen so that the data's
  latents have roughly zero mean and unit variance. Sampling N(0, I) there, then ``unscale_latents``,
  draws latents with the data's scale, which is what "sample the latent space" means for these models.

:func:`prior_latents` samples the scaled space by default (``space="vae"`` samples the VAE prior
itself); the samples show what the decoder makes of typical-scale latents, not a generative model of
images (that is the diffusion model's job). :func:`interpolation_latents` walks between two
posterior means linearly and spherically.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.latents.scaling import Source, scale_latents, scaled_shape, unscale_latents
from sdvae.model.family import patch_factor

SPACES = ("scaled", "vae")


def prior_latents(n: int, shape: tuple[int, int, int], config: Source, *, temperature: float = 1.0,
                  seed: int = 0, space: Literal["scaled", "vae"] = "scaled") -> torch.Tensor:
    """Draw latents from the prior, returned ready for the decoder (unscaled).

    Args:
        n: number of samples.
        shape: (C, h, w) of one (unscaled) latent.
        config: the normalisation source of :func:`scale_latents`: the model, or its config for every family
            but FLUX.2 (whose scaled latents are (4C, h/2, w/2): h and w must be even).
        temperature: multiplies the standard normal draw (< 1: nearer the mode).
        seed: seeds a private CPU generator; sample i is the same whatever ``n`` (draws are sequential).
        space: ``"scaled"``: z_scaled ~ N(0, T²I) in the diffusion space, then :func:`unscale_latents`;
            ``"vae"``: z ~ N(0, T²I) directly (the prior of the VAE's KL term).

    Returns:
        (n,C,h,w) float32 unscaled latents on the CPU.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    generator = torch.Generator().manual_seed(seed)
    drawn = scaled_shape(shape, config) if space == "scaled" else tuple(shape)
    eps = torch.randn((n, *drawn), generator=generator, dtype=torch.float32) * temperature
    return unscale_latents(eps, config) if space == "scaled" else eps


def sample_images(codec: Codec, n: int, size: tuple[int, int], *, temperature: float = 1.0, seed: int = 0,
                  space: Literal["scaled", "vae"] = "scaled", batch_size: int = 8) -> torch.Tensor:
    """Decode ``n`` prior samples (see :func:`prior_latents`).

    Args:
        codec: the model.
        n: number of images, ≥ 1.
        size: (H, W) in pixels; each a positive multiple of the downsampling factor.
        temperature, seed, space: as in :func:`prior_latents`.
        batch_size: latents decoded per model call.

    Returns:
        (n,C,H,W) float32 on the CPU, nominally in [-1, 1].

    Raises:
        UserError: ``n`` < 1, a size that is not a positive multiple of the factor, a negative temperature.
    """
    height, width = size
    f = codec.factor * (patch_factor(codec.config) if space == "scaled" else 1)  # FLUX.2: 2x2 patches
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if height < f or width < f or height % f or width % f:
        raise UserError(f"--size {height}x{width}: each side must be a positive multiple of the model's "
                        f"downsampling factor {f}" + (" (8, then FLUX.2's 2x2 latent patches)" if f != codec.factor
                                                      else ""))
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}")
    z = prior_latents(n, (codec.config.latent_channels, height // codec.factor, width // codec.factor), codec.master,
                      temperature=temperature, seed=seed, space=space)
    return torch.cat([codec.decode(chunk) for chunk in z.split(max(1, batch_size))])


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 − t)·a + t·b."""
    return torch.lerp(a, b, t)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation over the flattened tensors (White 2016, "Sampling generative networks").

    ``sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with θ the angle between a and b as vectors of all
    C·h·w entries: for high-dimensional Gaussian samples, which lie near a sphere, the path stays at
    a typical norm instead of cutting through the low-norm interior as lerp does. Falls back to lerp
    when a and b are (anti)parallel within float precision.

    Args:
        a, b: tensors of one shape.
        t: position in [0, 1] (0 gives a, 1 gives b).

    Returns:
        A tensor of the same shape and dtype.
    """
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(theta)) < 1e-6:
        return lerp(a, b, t)
    mix = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return mix.reshape(a.shape).to(a.dtype)


def interpolation_latents(za: torch.Tensor, zb: torch.Tensor, n: int, config: Source) -> dict[str, torch.Tensor]:
    """Latents between two posterior means, endpoints included.

    Linear interpolation does not depend on the space (the scaling is affine); spherical interpolation
    does, so it is done in the scaled space, whose origin is the centre of the data's latents (the
    VAE's own space has SD3/FLUX latents centred at the shift factor, not at 0). Endpoints are the
    given means exactly (not a round trip through the scaling).

    Args:
        za, zb: (1,C,h,w) or (C,h,w) unscaled posterior means of the same shape.
        n: number of points, ≥ 2, at t = 0, 1/(n−1), ..., 1.
        config: the normalisation source (the model; its config for every family but FLUX.2). FLUX.2
            latents with an odd side are interpolated spherically in the VAE's space (no 2x2 patches).

    Returns:
        {"linear": (n,C,h,w), "spherical": (n,C,h,w)} unscaled latents.
    """
    if n < 2:
        raise UserError(f"-n must be at least 2 (the two endpoints), got {n}")
    za, zb = za.reshape(1, *za.shape[-3:]).float(), zb.reshape(1, *zb.shape[-3:]).float()
    if scaled_shape(za.shape[-3:], config) != tuple(za.shape[-3:]) and (za.shape[-1] % 2 or za.shape[-2] % 2):
        config = {}  # FLUX.2 latents with an odd side have no 2x2 patches: interpolate in the VAE's space
    sa, sb = scale_latents(za, config), scale_latents(zb, config)
    ts = [i / (n - 1) for i in range(n)]
    linear = [lerp(za, zb, t) for t in ts]
    spherical = [unscale_latents(slerp(sa, sb, t), config) for t in ts]
    for path in (linear, spherical):
        path[0], path[-1] = za, zb
    return {"linear": torch.cat(linear), "spherical": torch.cat(spherical)}


def interpolate_images(codec: Codec, image_a: torch.Tensor, image_b: torch.Tensor, n: int,
                       batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Decode the linear and spherical paths between the posterior means of two images.

    Args:
        codec: the model.
        image_a, image_b: (1,C,H,W) in [-1, 1] of the same size (resize one first if needed).
        n: points per path, endpoints included.
        batch_size: latents decoded per model call.

    Returns:
        {"linear": (n,C,H,W), "spherical": (n,C,H,W)} float32 on the CPU, nominally in [-1, 1]; the
        first and last images are the decoded posterior means of A and B.
    """
    if image_a.shape != image_b.shape:
        raise ValueError(f"images must have one size, got {tuple(image_a.shape)} and {tuple(image_b.shape)}")
    enc_a, enc_b = codec.encode(image_a), codec.encode(image_b)
    paths = interpolation_latents(enc_a.mean.cpu(), enc_b.mean.cpu(), n, codec.master)
    return {name: torch.cat([codec.decode(chunk, enc_a.size) for chunk in z.split(max(1, batch_size))])
            for name, z in paths.items()}
