"""The fused eager path: the sub-pixel upsampling conv is the upsample-then-conv it replaces, the whole path
computes diffusers' encoder and decoder, the bf16 Codec uses it, and unknown structures fall back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdvae.codec.codec import Codec
from sdvae.codec.fused import fused_path, subpixel_weights, upsample_conv
from sdvae.model.build import build_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("h", "w", "bias"), [(5, 7, True), (1, 1, True), (4, 3, False)])
def test_subpixel_upsample_conv_is_upsample_then_conv(layout, h: int, w: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=bias).double().to(memory_format=layout)
    x = torch.randn(2, 6, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    weight, b = subpixel_weights(conv)
    out = upsample_conv(x, weight.double(), None if b is None else b.double())
    assert out.shape == ref.shape == (2, 5, 2 * h, 2 * w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=layout)


def test_fused_path_computes_diffusers_encoder_and_decoder_and_leaves_inputs_alone(test_vae) -> None:
    path = fused_path(test_vae.eval())
    assert path is not None
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    z = torch.randn(2, 4, 3, 5)
    x0, z0 = x.clone(), z.clone()
    with torch.no_grad():
        torch.testing.assert_close(path.encoder(x), test_vae.encoder(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(path.decoder(z), test_vae.decoder(z), rtol=0, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(z, z0)  # in-place work only on tensors the path made


def test_bf16_codec_runs_the_fused_path_within_bf16_tolerance(test_vae) -> None:
    x = torch.rand(1, 3, 32, 24) * 2 - 1
    fused = Codec(test_vae, dtype="bf16", tile="off")  # fused=None: on for bf16
    modules = Codec(build_preset("test"), dtype="bf16", tile="off", fused=False)
    calls: list[str] = []
    low = fused._model(torch.bfloat16)
    for up in (u for block in low.decoder.up_blocks for u in block.upsamplers or []):
        up.register_forward_pre_hook(lambda *_: calls.append("upsampler module"))
    out, enc = fused.roundtrip(x)
    ref, ref_enc = modules.roundtrip(x)
    assert fused._fused is not None and calls == []  # the upsampling convs ran in sub-pixel form
    scale = ref.abs().max().item()
    assert 0 < (out - ref).abs().max().item() < 0.05 * scale  # another rounding, the same function
    assert (enc.mean - ref_enc.mean).abs().max().item() < 0.05 * ref_enc.mean.abs().max().item()
    # fp32 never takes it: bit for bit the modules (tests/codec/test_codec.py compares with diffusers)
    assert Codec(build_preset("test"), tile="off")._fused is None


def test_unknown_structure_falls_back_to_the_modules(test_vae) -> None:
    class Custom(nn.Module):  # a user's own upsampler: not diffusers' Upsample2D
        def __init__(self, up: nn.Module):
            super().__init__()
            self.up = up

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self.up(x)

    block = next(b for b in test_vae.decoder.up_blocks if b.upsamplers)
    block.upsamplers[0] = Custom(block.upsamplers[0])
    assert fused_path(test_vae) is None
    codec = Codec(test_vae, dtype="bf16", tile="off", fused=True)
    out, _ = codec.roundtrip(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert codec._fused is None and torch.isfinite(out).all()
