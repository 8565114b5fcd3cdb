"""The ELBO and importance-weighted bounds of `sdvae eval`: the discretized likelihood, the bounds' algebra."""


from __future__ import annotations

import math

import pytest
import torch

from helpers import make_photo
from sdvae.codec.codec import Codec
from sdvae.eval.elbo import (
    SIGMA_GRID,
    BoundTerms,
    bound_terms,
    discretized_gaussian_log_likelihood,
    image_generator,
    log_likelihood_per_image,
    summarize_bounds,
)
from sdvae.metrics.pixel import quantize
from sdvae.train.losses import kl_divergence

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit value on the [-1, 1] scale


def _batch(codec: Codec, n: int = 2, size: int = 32) -> tuple[torch.Tensor, object]:
    photos = [torch.from_numpy(make_photo(size, size, seed=s)).permute(2, 0, 1).float() / 127.5 - 1 for s in range(n)]
    x = torch.stack([quantize(photo[None])[0] * 2 - 1 for photo in photos])
    return x, codec.encode(x)


# --------------------------------------------------------------------------------------------------
# The likelihood and the bounds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [-1.5, -1.0, -0.37, 0.0, 0.5, 0.999, 1.0, 3.0])
@pytest.mark.parametrize("sigma", [1 / 255, 0.003, 0.05, 0.5, 4.0])
def test_discretized_gaussian_is_a_distribution_over_the_256_values(mean, sigma):
    log_p = discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean), sigma)
    assert log_p.dtype == torch.float64 and torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_matches_the_gaussian_mass_of_each_bin():
    normal = torch.distributions.Normal(torch.tensor(0.1, dtype=torch.float64), 0.2)
    x = LEVELS[100:110]
    expected = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, torch.tensor(0.1), 0.2).exp(), expected)
    # Edge bins reach to ±inf; far tails stay finite (no log(0)) where a naive CDF difference underflows.
    edge = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0]), torch.tensor(0.1), 0.2).exp()
    torch.testing.assert_close(edge, torch.stack([normal.cdf(torch.tensor(-1 + 1 / 255)),
                                                  1 - normal.cdf(torch.tensor(1 - 1 / 255))]))
    far = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([1.0, -1.0, -1.0]), 1 / 255)
    assert torch.isfinite(far).all() and (far < -1000).all()


def test_bits_per_dim_of_the_distortion_are_nonnegative(codec):
    x, enc = _batch(codec)
    terms = bound_terms(codec, x, enc, SIGMA_GRID, 2, [image_generator(0, i) for i in range(2)])
    assert terms.log_px.shape == (2, len(SIGMA_GRID), 2) and terms.dims == 3 * 32 * 32
    assert (terms.log_px <= 0).all()  # a probability of the 8-bit image: −log2 p ≥ 0 bits
    assert (terms.distortion() >= 0).all()


def test_elbo_decomposes_into_distortion_and_rate_and_the_rate_estimates_the_kl(codec):
    x, enc = _batch(codec)
    k = 64
    terms = bound_terms(codec, x, enc, (0.1, 0.3), k, [image_generator(3, i) for i in range(2)])
    torch.testing.assert_close(terms.elbo(), -(terms.distortion() + terms.rate()[None]), rtol=1e-12, atol=1e-9)
    # Closed form: the same KL as the training loss (batch mean of nats per image).
    assert terms.kl.mean().item() == pytest.approx(kl_divergence(enc.mean, enc.logvar).item(), rel=1e-5)
    # The Monte-Carlo rate (1/K) Σ log q − log p is an unbiased estimate of it.
    per_sample = -terms.log_prior_ratio  # (K,B)
    tolerance = 5 * per_sample.std(0) / math.sqrt(k) + 1e-6
    assert ((per_sample.mean(0) - terms.kl).abs() <= tolerance).all()


def test_log_density_ratio_is_that_of_the_posterior_and_the_prior(codec):
    x, enc = _batch(codec, n=1)
    terms = bound_terms(codec, x, enc, (0.1,), 3, [image_generator(5, 0)])
    eps = torch.randn((3, *enc.mean.shape[1:]), generator=image_generator(5, 0), dtype=torch.float64)
    mean, std = enc.mean[0].double(), torch.exp(0.5 * enc.logvar[0].double())
    q = torch.distributions.Normal(mean, std)
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    for j in range(3):
        z = mean + std * eps[j]
        expected = prior.log_prob(z).sum() - q.log_prob(z).sum()
        assert terms.log_prior_ratio[j, 0].item() == pytest.approx(expected.item(), rel=1e-9)


def test_iw_bound_is_never_below_the_elbo_and_equals_it_for_one_sample(codec):
    x, enc = _batch(codec)
    gens = [image_generator(0, i) for i in range(2)]
    one = bound_terms(codec, x, enc, SIGMA_GRID, 1, gens)
    assert torch.equal(one.iw_elbo(), one.elbo())
    many = bound_terms(codec, x, enc, SIGMA_GRID, 6, [image_generator(0, i) for i in range(2)])
    assert (many.iw_elbo() >= many.elbo()).all()
    # The same holds for arbitrary log-weights (Jensen, not luck): large spreads, many shapes.
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 50):
        log_px = -torch.rand((k, 3, 4), generator=gen, dtype=torch.float64) * 1e5
        synthetic = BoundTerms(log_px, torch.randn((k, 4), generator=gen, dtype=torch.float64) * 100,
                               torch.zeros(4, dtype=torch.float64), dims=12)
        assert (synthetic.iw_elbo() >= synthetic.elbo()).all()


def test_log_likelihood_per_image_scores_every_sigma():
    x = LEVELS[torch.randint(0, 256, (2, 3, 5, 4), generator=torch.Generator().manual_seed(0))].float()
    recon = x + 0.05
    out = log_likelihood_per_image(x, recon, (0.02, 0.2))
    assert out.shape == (2, 2)
    assert out[1, 0].item() == pytest.approx(discretized_gaussian_log_likelihood(x[0], recon[0], 0.2).sum().item())


def test_sigma_auto_picks_the_grid_maximum():
    gen = torch.Generator().manual_seed(1)
    sigmas = (0.01, 0.02, 0.04, 0.08)
    elbo = -torch.rand((5, 4), generator=gen, dtype=torch.float64) * 1000
    elbo[:, 2] += 400  # the best mean ELBO
    zeros = torch.zeros(5, dtype=torch.float64)
    dims = torch.full((5,), 300.0, dtype=torch.float64)
    out = summarize_bounds(elbo, elbo, -elbo, zeros, zeros, dims, sigmas, fitted=True)
    assert out["sigma"] == 0.04 and out["sigma_index"] == 2 and "fitted" in out["sigma_rule"]
    assert out["elbo_bpd"]["mean"] == min(c["elbo_bpd"] for c in out["curve"])
    assert out["elbo_bpd"]["mean"] == pytest.approx(float((-elbo[:, 2] / (300 * math.log(2))).mean()))
    assert "warning" not in out
    edge = summarize_bounds(elbo[:, :2], elbo[:, :2], -elbo[:, :2], zeros, zeros, dims, sigmas[:2], fitted=True)
    assert "edge of the grid" in edge["warning"]


def test_image_generators_are_independent_of_batching():
    a = torch.randn(4, generator=image_generator(0, 7))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 7)))
