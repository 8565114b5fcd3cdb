"""Exact tiling and the Codec for grayscale (1-channel) and RGBA (4-channel) VAEs."""

from __future__ import annotations

import pytest
import torch

from sdvae.codec.codec import Codec
from sdvae.codec.tiling import tiled_decode, tiled_encode
from sdvae.errors import UserError
from sdvae.model.build import build_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py


@pytest.mark.parametrize("channels", [1, 4])
def test_tiled_equals_untiled(channels: int) -> None:
    vae = build_preset("test", image_channels=channels)
    x = torch.rand(1, channels, 56, 88, generator=torch.Generator().manual_seed(channels)) * 2 - 1
    z = torch.randn(1, 4, 7, 11, generator=torch.Generator().manual_seed(10 + channels))
    with torch.no_grad():
        h = vae.encoder(x)
        ref_moments = vae.quant_conv(h)
        ref_images = vae.decode(z).sample
    moments = tiled_encode(vae, x, tile_bytes=4096)  # small 2-D tiles
    images = tiled_decode(vae, z, tile_bytes=4096)
    assert moments.shape == ref_moments.shape == (1, 8, 7, 11)
    assert images.shape == ref_images.shape == (1, channels, 56, 88)
    assert (moments - ref_moments).abs().max().item() < 1e-4
    assert (images - ref_images).abs().max().item() < 1e-4

    tiled, plain = (Codec(vae, tile=mode) for mode in ("on", "off"))
    assert tiled.channels == plain.channels == channels
    odd = x[..., :53, :85]  # padded to multiples of 8, then cropped back
    a, enc_a = tiled.roundtrip(odd)
    b, enc_b = plain.roundtrip(odd)
    assert a.shape == b.shape == (1, channels, 53, 85)
    assert (enc_a.mean - enc_b.mean).abs().max().item() < 1e-4 and (a - b).abs().max().item() < 1e-4


def test_codec_refuses_other_channel_counts_in_one_line() -> None:
    with pytest.raises(UserError, match="model has 2 image channels") as err:
        Codec(build_preset("test", image_channels=2))
    assert "\n" not in str(err.value)
