"""Codec: any-size images, precision fallback, tiling policy, sampling."""

from __future__ import annotations

import pytest
import torch

from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.model.build import build_preset


def test_any_size_roundtrip_crops_back_and_matches_diffusers(test_vae) -> None:
    x = torch.rand(1, 3, 21, 30) * 2 - 1
    codec = Codec(test_vae, tile="off")
    recon, enc = codec.roundtrip(x)
    assert recon.shape == x.shape
    assert enc.mean.shape == (1, 4, 3, 4) and enc.size == (21, 30)
    # Same as diffusers on the reflect-padded image, cropped.
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3), mode="reflect")
    with torch.no_grad():
        ref = test_vae.decode(test_vae.encode(padded).latent_dist.mean).sample[..., :21, :30]
    assert torch.equal(recon, ref)


def test_sampling_is_seeded_and_differs_from_mean(test_vae) -> None:
    codec = Codec(test_vae, tile="off")
    enc = codec.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    a = enc.latents(True, torch.Generator().manual_seed(1))
    b = enc.latents(True, torch.Generator().manual_seed(1))
    c = enc.latents(True, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, enc.mean)
    # z = mean + exp(logvar/2)·ε: the standardized draw is the generator's normal sample.
    eps = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close((a - enc.mean) / torch.exp(0.5 * enc.logvar), eps)


def test_low_precision_falls_back_to_fp32_on_overflow() -> None:
    vae = build_preset("test")
    with torch.no_grad():  # make the last conv overflow fp16 (max 65504) but not fp32
        vae.decoder.conv_out.weight.mul_(1e6)
    z = torch.randn(1, 4, 2, 2)
    fp32 = Codec(build_preset("test"), tile="off")
    fp32.master.load_state_dict(vae.state_dict())
    low = Codec(vae, dtype="fp16", tile="off")
    out = low.decode(z)
    assert torch.isfinite(out).all()
    assert any("fp16" in n and "fp32" in n for n in low.notes)
    assert torch.equal(out, fp32.decode(z))


def test_bf16_runs_without_fallback(test_vae) -> None:
    codec = Codec(test_vae, dtype="bf16", tile="off")
    out, _ = codec.roundtrip(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert out.dtype == torch.float32 and codec.notes == []
    ref, _ = Codec(build_preset("test"), tile="off").roundtrip(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert out.shape == ref.shape


def test_low_precision_copy_logs_no_warning(test_vae) -> None:
    """Making the bf16 copy must not log diffusers' "modules that should be kept in float32: []"."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # its own handler; it does not propagate to root
    diffusers_logger.addHandler(handler)
    try:
        Codec(test_vae, dtype="bf16", tile="off").decode(torch.zeros(1, 4, 2, 2))
    finally:
        diffusers_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


@pytest.mark.parametrize("tile", ["on", "off", "auto"])
def test_tiling_modes_agree(test_vae, tile: str) -> None:
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    ref, _ = Codec(build_preset("test"), tile="off").roundtrip(x)
    out, _ = Codec(test_vae, tile=tile).roundtrip(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Automatic precision


@pytest.mark.parametrize(("avx512_bf16", "amx_bf16", "expected"),
                         [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_follows_the_hardware_rule(test_vae, monkeypatch, avx512_bf16: bool, amx_bf16: bool,
                                                  expected: str) -> None:
    """The codec's ``auto`` is the README's rule on what torch reports about the CPU (the real detector runs:
    only torch's capability report is replaced; tests/model/test_dtypes.py covers the rule itself)."""
    from sdvae.model import dtypes

    caps = {**torch.cpu.get_capabilities(), "avx512_bf16": avx512_bf16, "amx_bf16": amx_bf16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))
    assert dtypes.resolve_dtype("auto", "cpu") == expected
    assert Codec(test_vae, dtype="auto", device="cpu").dtype_name == expected
    assert dtypes.resolve_dtype("fp16", "cpu") == "fp16"  # explicit choices are kept, fp16 only on request
    if not torch.cuda.is_available():
        assert dtypes.resolve_dtype("auto", "cuda") == "fp32"
    with pytest.raises(UserError, match="unknown dtype"):
        dtypes.resolve_dtype("fp8", "cpu")


def test_bf16_reconstruction_is_close_to_fp32_on_the_embedded_checkpoint() -> None:
    from helpers import REPO, make_photo
    from sdvae.metrics.pixel import psnr, quantize
    from sdvae.model.load import load_vae

    vae = load_vae(REPO / "checkpoints" / "sdvae-tiny-f8c4")
    x = torch.from_numpy(make_photo(64, 48, seed=1)).permute(2, 0, 1).float()[None] / 127.5 - 1
    full, _ = Codec(vae, dtype="fp32").roundtrip(x)
    half, _ = Codec(vae, dtype="bf16").roundtrip(x)
    # measured 52.4 (v1, v2), 52.9 (v3), 52.5 (v4), 52.0 dB (v5)
    assert float(psnr(quantize(full), quantize(half))[0]) > 45.0
    quality_fp32, quality_bf16 = (float(psnr(quantize(r), quantize(x))[0]) for r in (full, half))
    assert abs(quality_fp32 - quality_bf16) < 0.1  # measured 0.02 (v1, v3, v4), 0.03 (v2), 0.04 dB (v5)
