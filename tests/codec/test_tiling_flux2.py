"""Exact tiling and the Codec for FLUX.2 VAEs (AutoencoderKLFlux2): tiled equals untiled, as for SD."""

from __future__ import annotations

import pytest
import torch

from flux2_helpers import small_flux2
from sdvae.codec.codec import Codec
from sdvae.codec.tiling import tiled_decode, tiled_encode
from sdvae.latents.scaling import scale_latents

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py


def test_tiled_equals_untiled_flux2() -> None:
    vae = small_flux2()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 8, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_moments = vae.quant_conv(vae.encoder(x))
        ref_images = vae.decode(z).sample  # AutoencoderKLFlux2's own decode
    moments = tiled_encode(vae, x, tile_bytes=4096)  # small 2-D tiles
    images = tiled_decode(vae, z, tile_bytes=4096)
    assert moments.shape == ref_moments.shape == (1, 16, 8, 12)
    assert (moments - ref_moments).abs().max().item() < 1e-4
    assert (images - ref_images).abs().max().item() < 1e-4

    tiled, plain = (Codec(vae, tile=mode) for mode in ("on", "off"))
    a, enc_a = tiled.roundtrip(x)
    b, enc_b = plain.roundtrip(x)
    assert (enc_a.mean - enc_b.mean).abs().max().item() < 1e-4 and (a - b).abs().max().item() < 1e-4
    # ... and so are the scaled (patchified, BatchNorm-normalised) latents a diffusion model trains on.
    assert (scale_latents(enc_a.mean, vae) - scale_latents(enc_b.mean, vae)).abs().max().item() < 1e-3
