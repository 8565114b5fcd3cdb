"""Pixel metrics: banded PSNR/SSIM equal the whole-image definitions; quantization is the 8-bit grid."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from sdvae.metrics import pixel
from sdvae.metrics.pixel import psnr, quantize, ssim


def _pair(height: int, width: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(height * 1000 + width)
    a = torch.rand(batch, 3, height, width, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    return quantize(a * 2 - 1), quantize(b * 2 - 1)


# Heights around the band size (16 rows here) and its halo: one band, a last band of 1 row, many bands.
@pytest.mark.parametrize("height,width", [(11, 20), (16, 20), (17, 20), (21, 20), (33, 20), (70, 13), (12, 300)])
def test_banded_ssim_and_psnr_equal_whole_image(monkeypatch, height, width):
    a, b = _pair(height, width)
    whole_ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    whole_psnr = 10 * torch.log10(1.0 / (a.double() - b.double()).pow(2).flatten(1).mean(1))
    monkeypatch.setattr(pixel, "BAND_PIXELS", 16 * width)  # 16-row bands
    assert torch.allclose(ssim(a, b), whole_ssim, rtol=0, atol=1e-6)
    assert torch.allclose(psnr(a, b).double(), whole_psnr, rtol=0, atol=1e-4)
    assert ssim(a, b).shape == (2,) and psnr(a, b).shape == (2,)


def test_ssim_is_nan_below_the_window_and_one_for_identical_images():
    a, _ = _pair(10, 40)
    assert torch.isnan(ssim(a, a)).all()
    a, _ = _pair(40, 40)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert torch.isinf(psnr(a, a)).all()


def test_quantize_rounds_to_the_8bit_grid_without_touching_its_input():
    x = torch.tensor([[-1.5, -1.0, -0.5, 0.0, 0.00196, 1.0, 2.0]]).view(1, 1, 1, 7)
    before = x.clone()
    q = quantize(x)
    assert torch.equal(x, before)
    assert torch.equal(q * 255, torch.tensor([[0.0, 0.0, 64.0, 128.0, 128.0, 255.0, 255.0]]).view(1, 1, 1, 7))
