"""Information measures of a Gaussian posterior code: the closed-form KL to the prior and bits per dimension.

Training logs them (the KL term's rate) and ``sdvae eval`` reports them beside its bounds, so both
use these definitions.
"""

from __future__ import annotations

import math

import torch


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL( N(mean, exp(logvar)) ‖ N(0, I) ) per image, in nats.

    ``0.5 · Σ (mean² + exp(logvar) − 1 − logvar)`` summed over all latent dimensions (C, h, w), computed
    in fp32 whatever the input dtype (under autocast the posterior may arrive in bf16/fp16).

    Args:
        mean, logvar: (B, C, h, w) posterior mean and log-variance.

    Returns:
        (B,) fp32, ≥ 0.
    """
    m, lv = mean.float(), logvar.float()
    return (0.5 * (m.square() + lv.exp() - 1.0 - lv)).flatten(1).sum(1)


def bits_per_dim(nats: torch.Tensor | float, dims: torch.Tensor | int) -> torch.Tensor | float:
    """A per-image quantity in nats as bits per image dimension (subpixel): ``nats / (D · ln 2)``."""
    return nats / (dims * math.log(2.0))
