"""FLUX.2's latent normalisation in sdvae.latents.scaling against diffusers' own Flux2Pipeline code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

from flux2_helpers import flux2_pipeline_class, small_flux2, small_flux2_folder
from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.latents.scaling import latent_normalization, scale_latents, scaled_shape, unscale_latents
from sdvae.latents.stats import posterior_stats


def _pipeline_normalise(pipe_cls: type, vae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline's normalisation, written as in its ``_encode_vae_image`` (static patchify, then BN stats)."""
    patched = pipe_cls._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched.device, patched.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patched.device,
                                                                                           patched.dtype)
    return (patched - mean) / std


def test_scale_equals_the_pipelines_normalisation_and_unscale_inverts_it() -> None:
    pipe_cls = flux2_pipeline_class()
    vae = small_flux2()
    z = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(0))
    scaled = scale_latents(z, vae)
    assert scaled.shape == (2, 32, 3, 5) == (2, *scaled_shape((8, 6, 10), vae))
    assert torch.equal(scaled, _pipeline_normalise(pipe_cls, vae, z))
    # The pipeline's decode path: latents * std + mean, then _unpatchify_latents.
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    theirs = pipe_cls._unpatchify_latents(scaled * std + vae.bn.running_mean.view(1, -1, 1, 1))
    assert torch.equal(unscale_latents(scaled, vae), theirs)
    torch.testing.assert_close(unscale_latents(scaled, vae), z, rtol=0, atol=1e-5)
    # The recorded dict (what encode-dataset stores) and the folder give the very same result.
    assert torch.equal(scale_latents(z, latent_normalization(vae)), scaled)


def test_pipeline_built_on_our_folder_encodes_to_our_scaled_latents(tmp_path: Path) -> None:
    """Flux2Pipeline with our saved FLUX.2 folder as its VAE: ``_encode_vae_image`` = sdvae's encode + scale.

    The pipeline's text encoder (Mistral 3) and transformer are not needed by its VAE code and cannot be
    made offline without ``transformers``, so they are None (see flux2_helpers.flux2_pipeline_class).
    """
    folder = small_flux2_folder(tmp_path / "vae")
    pipe = flux2_pipeline_class()(scheduler=FlowMatchEulerDiscreteScheduler(),
                                  vae=AutoencoderKLFlux2.from_pretrained(folder), text_encoder=None, tokenizer=None,
                                  transformer=None)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        theirs = pipe._encode_vae_image(image, generator=None)
    ours = scale_latents(Codec(small_flux2(), tile="off").encode(image).mean, folder)
    assert ours.shape == theirs.shape == (1, 32, 2, 3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_config_alone_is_refused_and_odd_sides_are_one_line(tmp_path: Path) -> None:
    vae = small_flux2()
    with pytest.raises(UserError, match="BatchNorm statistics"):
        scale_latents(torch.zeros(1, 8, 2, 2), vae.config)  # the statistics are in the weights
    with pytest.raises(UserError, match="5x4 cannot be patchified") as err:
        scale_latents(torch.zeros(1, 8, 5, 4), vae)
    assert "\n" not in str(err.value)
    folder = small_flux2_folder(tmp_path / "vae")
    assert latent_normalization(folder) == latent_normalization(vae) == latent_normalization(folder / "config.json")


def test_patchified_posterior_statistics_match_a_direct_computation() -> None:
    """posterior_stats(patch=True): per patchified channel E[mean], Var[mean] + E[σ²], exactly."""
    gen = torch.Generator().manual_seed(2)
    mean, logvar = torch.randn(3, 8, 4, 6, generator=gen) * 2 + 1, torch.randn(3, 8, 4, 6, generator=gen) - 2
    stats = posterior_stats([(mean[:2], logvar[:2]), (mean[2:], logvar[2:])], patch=True)
    pm = small_flux2().bn  # only for the channel count
    assert len(stats.channel_mean) == pm.num_features == 32 and stats.patchified
    flat_m = flux2_pipeline_class()._patchify_latents(mean.double()).transpose(0, 1).reshape(32, -1)
    flat_v = flux2_pipeline_class()._patchify_latents(logvar.double().exp()).transpose(0, 1).reshape(32, -1)
    want_std = (flat_m.var(1, unbiased=False) + flat_v.mean(1)).sqrt()
    torch.testing.assert_close(torch.tensor(stats.channel_mean, dtype=torch.float64), flat_m.mean(1))
    torch.testing.assert_close(torch.tensor(stats.channel_std, dtype=torch.float64), want_std)
