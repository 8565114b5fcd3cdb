"""fp16 inference that overflows falls back to fp32: finite output equal to the fp32 run, and a note saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_photo
from sdvae.codec.codec import Codec


def _overflowing_vae():
    """The `test` preset with its first convolutions scaled ×1e6: fp16 (max 65504) overflows, fp32 does not.

    Each scaled convolution feeds a GroupNorm, so in fp32 the scale cancels and the outputs stay ordinary.
    """
    from sdvae.model.build import build_preset

    vae = build_preset("test")
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(1e6)
            conv.bias.mul_(1e6)
    return vae


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(make_photo(40, 32)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_fp16_overflow_really_happens_without_the_fallback(images: torch.Tensor) -> None:
    vae = _overflowing_vae().half()
    with torch.inference_mode():
        h = vae.encoder(images.half())
        z = torch.zeros(1, 4, 4, 5, dtype=torch.float16)
        decoded = vae.decode(z).sample
    assert not torch.isfinite(h).all() and not torch.isfinite(decoded).all()


def test_fp16_fallback_is_finite_and_equals_fp32(images: torch.Tensor) -> None:
    fp32 = Codec(_overflowing_vae(), dtype="fp32", tile="off")
    fp16 = Codec(_overflowing_vae(), dtype="fp16", tile="off")
    ref, ref_enc = fp32.roundtrip(images)
    out, enc = fp16.roundtrip(images)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert torch.equal(out, ref) and torch.equal(enc.mean, ref_enc.mean)
    assert fp16.notes == ["encode in fp16 produced non-finite values; redone in fp32",
                          "decode in fp16 produced non-finite values; redone in fp32"]
    assert fp32.notes == []


def test_roundtrip_json_carries_the_fallback_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sdvae.cli.main import main
    from sdvae.model.save import save_diffusers

    model = save_diffusers(_overflowing_vae(), tmp_path / "model")
    photo = tmp_path / "photo.png"
    Image.fromarray(make_photo(40, 32)).save(photo)
    results = {}
    for dtype in ("fp16", "fp32"):
        capsys.readouterr()
        assert main(["roundtrip", str(photo), "--model", str(model), "--dtype", dtype, "--tile", "off", "--json",
                     "-o", str(tmp_path / f"{dtype}.png")]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    notes = results["fp16"]["notes"]
    assert any("encode in fp16 produced non-finite values; redone in fp32" in n for n in notes), notes
    assert not any("redone" in n for n in results["fp32"]["notes"])
    assert results["fp16"]["psnr"] == results["fp32"]["psnr"]
    assert Image.open(tmp_path / "fp16.png").tobytes() == Image.open(tmp_path / "fp32.png").tobytes()
