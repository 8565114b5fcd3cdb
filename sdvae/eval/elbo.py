"""The evidence lower bound (ELBO) of a KL-VAE on 8-bit images, and its importance-weighted tightening.

The VAE is read as the latent-variable model it was trained as:

* **prior** ``p(z) = N(0, I)`` on the VAE's *native* (unscaled) latents z of shape (C, h, w), the
  prior of the KL term in the training loss. ``scaling_factor``/``shift_factor`` are a convenience
  for diffusion models (:mod:`sdvae.latents.format`) and play no part here.
* **posterior** ``q(z|x) = N(mean, diag(exp(logvar)))`` from the encoder (:class:`sdvae.codec.codec.Encoded`).
* **likelihood** ``p(x|z)``: the D = C·H·W subpixels (C image channels) of the 8-bit image are independent *discretised
  Gaussians* (PixelCNN++ / DDPM's decoder): the mean is the decoder output clamped to [-1, 1], the
  scale is one scalar σ (on the [-1, 1] scale; σ·127.5 in 8-bit units), and the probability of the
  8-bit value v (at x = v/127.5 − 1) is the Gaussian mass of its bin [x − 1/255, x + 1/255], with the
  first and last bins extended to −∞ and +∞. That makes p(x|z) a proper probability mass over the
  256^D possible images, so −log₂ p ≥ 0 and every bits/dim figure below is ≥ 0 and ≤ 8 for a
  useful model.

The SD VAEs were trained with L1/MSE + LPIPS (+ GAN), which is not this likelihood, and their
checkpoints carry no variance, so σ is either given (``--sigma``) or fitted: the σ of a fixed
log-spaced grid (:data:`SIGMA_GRID`) with the best mean ELBO on the evaluated images (one scalar,
so the optimism of fitting it on the test images is negligible; it is reported as fitted).

Bounds, for K reparameterised draws z_k = mean + exp(logvar/2)·ε_k and log-weights
``log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x)``:

* ELBO = (1/K) Σ_k log w_k (the Monte-Carlo estimate of E_q[log p(x|z)] − KL(q‖p));
* IW-ELBO (Burda et al. 2016) = log (1/K) Σ_k exp(log w_k), ≥ the ELBO of the *same* draws by
  Jensen's inequality, exactly (not only in expectation), and equal to it for K = 1.

Both are lower bounds of log p(x) in nats; reported as ``−bound / (D · ln 2)`` bits/dim they are
upper bounds of the negative log-likelihood, so there the IW figure is the *smaller* one. The ELBO
splits into distortion ``−(1/K) Σ log p(x|z_k)`` and rate ``(1/K) Σ [log q(z_k|x) − log p(z_k)]``
(the Monte-Carlo KL); the closed-form KL (:func:`sdvae.metrics.information.gaussian_kl`) is reported beside it.
All of this is float64: the sums run over hundreds of thousands of terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sdvae.metrics.information import bits_per_dim, gaussian_kl
from sdvae.seeding import seeded_generator

if TYPE_CHECKING:  # the likelihood itself is plain torch; only bound_terms needs a model
    from sdvae.codec.codec import Codec, Encoded

BIN_HALF_WIDTH = 1.0 / 255.0  # half of an 8-bit step (2/255) on the [-1, 1] scale
# 24 log-spaced σ from 1/255 (half a bin: the likelihood can no longer tell finer σ apart) to 0.5
# (a quarter of the whole range): wide enough for any decoder worth evaluating.
SIGMA_GRID: tuple[float, ...] = tuple(
    float(s) for s in torch.logspace(math.log10(1 / 255), math.log10(0.5), 24, dtype=torch.float64)
)
_LOG_2PI = math.log(2 * math.pi)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Elementwise log-probability of 8-bit values under a discretised Gaussian (edge bins to ±∞).

    Args:
        x: (...) values on the 8-bit grid of [-1, 1] (v/127.5 − 1 for v in 0..255).
        mean: (...) broadcastable to ``x``; clamped to [-1, 1] (the range a decoded image is shown in).
        sigma: the scale on the [-1, 1] scale, > 0.

    Returns:
        float64 tensor of log P(x) in nats, each ≤ 0; exp of it sums to 1 over the 256 values.
    """
    x = x.double()
    mean = mean.double().clamp(-1.0, 1.0)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    # Half a bin from the ends marks the first/last bin, robust to the ±1 ulp of x = v/127.5 − 1.
    upper = torch.where(x > 1 - BIN_HALF_WIDTH, inf, (x + BIN_HALF_WIDTH - mean) / sigma)
    lower = torch.where(x < -1 + BIN_HALF_WIDTH, -inf, (x - BIN_HALF_WIDTH - mean) / sigma)
    # log(Φ(u) − Φ(l)) without cancellation: Φ(u) − Φ(l) = Φ(−l) − Φ(−u), so always work in the lower
    # tail (where log_ndtr is accurate) by mirroring bins whose centre lies above the mean.
    mirror = (lower + upper) > 0
    hi = torch.where(mirror, -lower, upper)
    lo = torch.where(mirror, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def log_likelihood_per_image(x: torch.Tensor, recon: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """log p(x|z) of whole images for every σ of a grid (one pass over the data, σ in the inner loop).

    Args:
        x: (B,C,H,W) images on the 8-bit grid of [-1, 1].
        recon: (B,C,H,W) decoder output for z (any range; clamped to [-1, 1]).
        sigmas: S scales.

    Returns:
        (S,B) float64 log-likelihoods in nats.
    """
    # Per image and per σ, so the float64 temporaries stay at one image's size even for large images.
    out = torch.empty(len(sigmas), x.shape[0], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        for s, sigma in enumerate(sigmas):
            out[s, b] = discretized_gaussian_log_likelihood(x[b], recon[b], sigma).sum()
    return out.cpu()


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator private to one image, so its draws do not depend on batch size, order or --limit."""
    return seeded_generator("sdvae-elbo", seed, index)


@dataclass
class BoundTerms:
    """Per-image ingredients of the bounds for one batch (float64, CPU).

    Attributes:
        log_px: (K,S,B) log p(x|z_k) for each of the S grid σ.
        log_prior_ratio: (K,B) log p(z_k) − log q(z_k|x).
        kl: (B,) closed-form KL(q(z|x) ‖ N(0, I)) in nats.
        dims: D = C·H·W, the number of subpixels the likelihood covers.
    """

    log_px: torch.Tensor
    log_prior_ratio: torch.Tensor
    kl: torch.Tensor
    dims: int

    @property
    def log_weights(self) -> torch.Tensor:
        """(K,S,B) importance log-weights log p(x|z_k) + log p(z_k) − log q(z_k|x)."""
        return self.log_px + self.log_prior_ratio[:, None, :]

    def elbo(self) -> torch.Tensor:
        """(S,B) ELBO in nats: the mean of the K log-weights."""
        return self.log_weights.mean(0)

    def iw_elbo(self) -> torch.Tensor:
        """(S,B) importance-weighted bound in nats: log-mean-exp of the K log-weights (≥ :meth:`elbo`)."""
        k = self.log_weights.shape[0]
        return torch.logsumexp(self.log_weights, 0) - math.log(k)

    def distortion(self) -> torch.Tensor:
        """(S,B) −(1/K) Σ log p(x|z_k) in nats."""
        return -self.log_px.mean(0)

    def rate(self) -> torch.Tensor:
        """(B,) Monte-Carlo KL (1/K) Σ [log q(z_k|x) − log p(z_k)] in nats (ELBO = −distortion − rate)."""
        return -self.log_prior_ratio.mean(0)


@torch.no_grad()
def bound_terms(codec: Codec, x: torch.Tensor, enc: Encoded, sigmas: Sequence[float], k: int,
                generators: Sequence[torch.Generator]) -> BoundTerms:
    """Draw K posterior samples per image, decode them and score them.

    Args:
        codec: the model.
        x: (B,C,H,W) images on the 8-bit grid of [-1, 1] (the images ``enc`` encodes).
        enc: ``codec.encode(x)``.
        sigmas: S likelihood scales to score every sample with.
        k: number of samples K ≥ 1.
        generators: B CPU generators, one per image (:func:`image_generator`).

    Returns:
        The per-image terms.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mean, logvar = enc.mean.double().cpu(), enc.logvar.double().cpu()
    std = torch.exp(0.5 * logvar)
    # (K,B,C,h,w); each image draws its own K samples from its own generator.
    eps = torch.stack([torch.randn((k, *mean.shape[1:]), generator=g, dtype=torch.float64) for g in generators], 1)
    log_q_const = -0.5 * (logvar + _LOG_2PI).flatten(1).sum(1)  # (B,)
    dev = codec.device
    x_dev = x.to(dev)
    log_px, log_ratio = [], []
    for eps_k in eps:
        z = mean + std * eps_k
        recon = codec.decode(z.float(), enc.size)
        log_px.append(log_likelihood_per_image(x_dev, recon.to(dev), sigmas))
        log_p = -0.5 * (z.square() + _LOG_2PI).flatten(1).sum(1)
        # (z − mean)²/var is ε² exactly: use it rather than recomputing it with rounding error.
        log_q = log_q_const - 0.5 * eps_k.square().flatten(1).sum(1)
        log_ratio.append(log_p - log_q)
    kl = gaussian_kl(mean, logvar)
    return BoundTerms(torch.stack(log_px), torch.stack(log_ratio), kl, dims=x.shape[1] * x.shape[2] * x.shape[3])



def summarize_bounds(elbo: torch.Tensor, iw: torch.Tensor, distortion: torch.Tensor, rate: torch.Tensor,
                     kl: torch.Tensor, dims: torch.Tensor, sigmas: Sequence[float], fitted: bool) -> dict:
    """Pick σ and reduce per-image bounds to the reported figures.

    Args:
        elbo, iw, distortion: (N,S) per-image nats for each grid σ.
        rate, kl: (N,) per-image nats (σ-independent).
        dims: (N,) subpixels per image.
        sigmas: the S grid values.
        fitted: whether the grid is the automatic one (σ chosen on these images) or one fixed σ.

    Returns:
        JSON-able dict: the σ used (and its grid index ``sigma_index``), mean ± std (population) of the
        ELBO and IW bounds in bits/dim, their parts, mean nats per image, and the mean ELBO for every grid σ.
    """
    dims = dims.double()[:, None]
    elbo_bpd = bits_per_dim(-elbo, dims)  # (N,S)
    curve = elbo_bpd.mean(0)
    best = int(torch.argmin(curve))  # smallest bits/dim = largest mean ELBO

    def stats(values: torch.Tensor) -> dict[str, float]:
        return {"mean": float(values.mean()), "std": float(values.std(correction=0))}

    out = {
        "sigma_index": best,
        "sigma": sigmas[best],
        "sigma_8bit": sigmas[best] * 127.5,
        "sigma_rule": (f"fitted: the grid value with the best mean ELBO ({len(sigmas)} log-spaced values "
                       f"{sigmas[0]:.5g}..{sigmas[-1]:.5g} on the [-1,1] scale)" if fitted else "fixed (--sigma)"),
        "elbo_bpd": stats(elbo_bpd[:, best]),
        "iw_bpd": stats(bits_per_dim(-iw[:, best], dims[:, 0])),
        "distortion_bpd": stats(bits_per_dim(distortion[:, best], dims[:, 0])),
        "rate_bpd": stats(bits_per_dim(rate, dims[:, 0])),
        "kl_closed_form_bpd": stats(bits_per_dim(kl, dims[:, 0])),
        "elbo_nats": float(elbo[:, best].mean()),
        "iw_nats": float(iw[:, best].mean()),
        "curve": [{"sigma": s, "elbo_bpd": float(v)} for s, v in zip(sigmas, curve, strict=True)],
    }
    if fitted and best in (0, len(sigmas) - 1):
        out["warning"] = "the fitted sigma is at the edge of the grid; pass --sigma to evaluate another value"
    return out
