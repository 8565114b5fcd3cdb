"""The transformed pairs of the diffusability regularisers: which τ, applied to which image and latent.

``loss.equivariance`` (EQ-VAE, Kouzelis et al., ICML 2025) asks ``decode(τ(z)) ≈ τ(x)`` for one τ per
micro-batch drawn from ``loss.equivariance_transforms``; ``loss.scale_equivariance`` (Skorokhodov et al.
2025, "Improving the Diffusability of Autoencoders") asks the same for τ = ×½ box downsampling. This
module draws τ and builds the pairs (target τ(x), decoded τ(z)); :class:`sdvae.train.losses.VAELoss`
scores them with its reconstruction term and adds them to the total. τ is
:func:`sdvae.images.transforms.transform`, the transform ``sdvae eval --diffusability`` measures with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sdvae.errors import UserError
from sdvae.images.transforms import SCALES, transform
from sdvae.seeding import seeded_generator

if TYPE_CHECKING:
    from sdvae.train.config import LossConfig

SCALE_EQUIVARIANCE_TRANSFORM = "scale_0.5"  # loss.scale_equivariance: 2×2 box average of x and z


def draw_transform(cfg: LossConfig, seed: int, position: int) -> str | None:
    """The EQ-VAE τ of micro-batch ``position``: uniform over ``cfg.equivariance_transforms``.

    A pure function of (seed, position), drawn from its own generator (:func:`sdvae.seeding.seeded_generator`),
    never the global RNG: a resumed run draws the τ sequence of an uninterrupted one, and every process
    draws the same τ for the same micro-batch count (the posterior noise is keyed the same way).

    Args:
        cfg: the loss config (``equivariance``, ``equivariance_transforms``).
        seed: the run's seed (``train.seed``).
        position: micro-batch counter (optimizer step × grad_accum + micro-batch).

    Returns:
        One name of ``cfg.equivariance_transforms``; None when ``cfg.equivariance`` is 0 (nothing drawn).
    """
    if cfg.equivariance <= 0:
        return None
    names = cfg.equivariance_transforms
    index = int(torch.randint(len(names), (1,), generator=seeded_generator(seed, "equivariance", position)))
    return names[index]


def _check_latent_sides(latents: torch.Tensor, name: str, key: str) -> None:
    """A one-line error when the latent grid cannot be resampled by τ onto whole cells."""
    if name not in SCALES:
        return
    q = SCALES[name][1]
    h, w = latents.shape[-2:]
    if h % q or w % q:
        raise UserError(f"{key}: {name} needs latent sides that are multiples of {q}, got {h}x{w} "
                        f"(data.resolution / downsampling factor)")


def transformed_pairs(
    cfg: LossConfig,
    images: torch.Tensor,
    latents: torch.Tensor | None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    tau: str | None,
) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """The enabled regularisers' pairs, ``{log name: (weight, τ(x), decode(τ(z)))}``; empty when both are off.

    τ acts on the fp32 images and latents outside autocast (a bf16 matmul would round the targets);
    ``decode`` runs under whatever autocast the caller holds, as the main decode does.

    Args:
        cfg: the loss config (``equivariance``, ``scale_equivariance``).
        images: (B, C, H, W) targets in [-1, 1].
        latents: (B, c, H/f, W/f) the sampled latent z, attached to the encoder's graph.
        decode: latents → images of the VAE being trained (:func:`sdvae.train.vae_forward.latent_decoder`).
        tau: this micro-batch's EQ-VAE τ (:func:`draw_transform`); required when ``cfg.equivariance > 0``.

    Returns:
        Per enabled term: its weight, the (B, C, H', W') target τ(x) and the (B, C, H', W') decoding of τ(z).

    Raises:
        UserError: the latent sides are not multiples of a scale's denominator (naming the key).
        ValueError: a needed argument is missing (a caller's mistake).
    """
    wanted = {}
    if cfg.equivariance > 0:
        if tau is None:
            raise ValueError("loss.equivariance > 0 needs tau (draw_transform)")
        wanted["equivariance"] = (cfg.equivariance, tau, "loss.equivariance_transforms")
    if cfg.scale_equivariance > 0:
        wanted["scale_equivariance"] = (cfg.scale_equivariance, SCALE_EQUIVARIANCE_TRANSFORM, "loss.scale_equivariance")
    if not wanted:
        return {}
    if latents is None or decode is None:
        raise ValueError("the diffusability regularisers need latents and decode")
    pairs = {}
    for name, (weight, tau_name, key) in wanted.items():
        _check_latent_sides(latents, tau_name, key)
        with torch.autocast(images.device.type, enabled=False):
            target = transform(images.float(), tau_name)
            moved = transform(latents.float(), tau_name)
        pairs[name] = (weight, target, decode(moved))
    return pairs
