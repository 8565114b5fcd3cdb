"""``sdvae eval`` of grayscale (1-channel) and RGBA (4-channel) VAEs: PSNR/SSIM over every channel, LPIPS on
the RGB view."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdvae.codec.codec import Codec
from sdvae.eval.engine import EvalSettings, apply_protocol, evaluate_source
from sdvae.eval.report import summary_lines
from sdvae.images.channels import rgb_view
from sdvae.images.sources import open_source
from sdvae.metrics.lpips import build_lpips, lpips_distance
from sdvae.metrics.pixel import psnr, quantize, ssim
from sdvae.model.build import build_preset


@pytest.mark.parametrize("channels", [1, 4])
def test_metrics_over_all_channels_and_lpips_on_the_rgb_view(channels: int, folder: Path, tmp_path: Path) -> None:
    from torchvision.models import squeezenet1_1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(squeezenet1_1(weights=None).state_dict(), tmp_path / "squeeze.pth")
    codec = Codec(build_preset("test", image_channels=channels))
    source = open_source(str(folder))
    settings = EvalSettings(resolution=32, batch_size=2, lpips=True, lpips_net="squeeze",
                            lpips_weights=str(tmp_path / "squeeze.pth"), fid=False, workers=0)
    report = evaluate_source(codec, source, settings, model_ref="test", progress=False)
    assert report["data"]["evaluated"] == 3 and report["model"]["image_channels"] == channels
    x = apply_protocol(source.load(source.files.index("img0.png"), channels), settings)[None]
    assert x.shape == (1, channels, 32, 32)
    recon, _ = codec.roundtrip(x)
    a, b = quantize(x), quantize(recon)
    row = next(r for r in report["per_image"] if r["name"] == "img0.png")
    assert row["psnr"] == pytest.approx(psnr(a, b).item(), rel=1e-5)
    assert row["ssim"] == pytest.approx(ssim(a, b).item(), rel=1e-5)
    net = build_lpips("squeeze", tmp_path / "squeeze.pth")
    expected = lpips_distance(net, rgb_view(a * 2 - 1), rgb_view(b * 2 - 1))
    assert row["lpips"] == pytest.approx(expected.item(), rel=1e-5)
    assert report["protocol"]["bits_per_dim"] == f"-bound / ({channels}·H·W·ln 2)"
    assert any("LPIPS and rFID on" in line for line in summary_lines(report))  # the protocol line says so
