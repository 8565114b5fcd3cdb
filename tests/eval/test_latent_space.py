"""Prior samples and interpolation (`sdvae sample` / `sdvae interpolate`)."""


from __future__ import annotations

import pytest
import torch

from helpers import make_photo
from sdvae.errors import UserError
from sdvae.eval.latent_space import interpolate_images, interpolation_latents, prior_latents, sample_images, slerp
from sdvae.latents.scaling import unscale_latents

# --------------------------------------------------------------------------------------------------
# The latent space: prior samples and interpolation
# --------------------------------------------------------------------------------------------------


def test_prior_samples_live_in_the_scaled_space():
    config = {"scaling_factor": 0.25, "shift_factor": 0.5}
    scaled = prior_latents(3, (4, 2, 2), config, seed=1)
    eps = torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled, unscale_latents(eps, config))
    torch.testing.assert_close(prior_latents(3, (4, 2, 2), config, seed=1, space="vae", temperature=0.5), eps * 0.5)


def test_sample_images_are_deterministic_by_seed(codec):
    a = sample_images(codec, 3, (16, 24), seed=7)
    assert a.shape == (3, 3, 16, 24)
    assert torch.equal(a, sample_images(codec, 3, (16, 24), seed=7))
    # Sample i does not depend on n or the batch size (up to the float differences of batched convolutions).
    torch.testing.assert_close(a, sample_images(codec, 3, (16, 24), seed=7, batch_size=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:2], sample_images(codec, 2, (16, 24), seed=7), atol=1e-5, rtol=1e-5)
    assert not torch.equal(a, sample_images(codec, 3, (16, 24), seed=8))
    with pytest.raises(UserError, match="multiple of the model's downsampling factor 8"):
        sample_images(codec, 1, (20, 16))


def test_slerp_properties():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 3, generator=gen), torch.randn(4, 3, 3, generator=gen)
    assert torch.equal(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    b = b * a.norm() / b.norm()  # same norm: slerp stays on the sphere, lerp cuts inside it
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert torch.lerp(a, b, 0.5).norm() < mid.norm()
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: falls back to lerp


def test_interpolation_endpoints_are_the_decoded_posterior_means(codec):
    img_a = torch.from_numpy(make_photo(24, 16, seed=0)).permute(2, 0, 1)[None].float() / 127.5 - 1
    img_b = torch.from_numpy(make_photo(24, 16, seed=5)).permute(2, 0, 1)[None].float() / 127.5 - 1
    paths = interpolate_images(codec, img_a, img_b, 5)
    expected_a = codec.decode(codec.encode(img_a).mean, (16, 24))[0]
    expected_b = codec.decode(codec.encode(img_b).mean, (16, 24))[0]
    for name in ("linear", "spherical"):
        assert paths[name].shape == (5, 3, 16, 24)
        torch.testing.assert_close(paths[name][0], expected_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(paths[name][-1], expected_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(paths["linear"][2], paths["spherical"][2])
    config = {"scaling_factor": 0.5, "shift_factor": 0.3}
    za, zb = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    latents = interpolation_latents(za, zb, 3, config)
    torch.testing.assert_close(latents["linear"][1], (za[0] + zb[0]) / 2)
    assert torch.equal(latents["spherical"][0], za[0]) and torch.equal(latents["spherical"][-1], zb[0])
    with pytest.raises(UserError, match="at least 2"):
        interpolation_latents(za, zb, 1, config)
