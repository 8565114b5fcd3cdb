"""Diffusability figures: spectrum, equivariance and latent statistics (sdvae.eval.diffusability)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdvae.codec.codec import Codec
from sdvae.eval import diffusability as D
from sdvae.eval.engine import EvalSettings, evaluate_source
from sdvae.eval.report import report_json, summary_lines
from sdvae.images.sources import open_source

FACTOR = 8


def _settings(**kw) -> EvalSettings:
    base = {"resolution": None, "batch_size": 2, "lpips": False, "fid": False, "workers": 0, "diffusability": True}
    return EvalSettings(**(base | kw))


# --------------------------------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [True, False])
def test_white_noise_has_a_flat_spectrum_and_three_quarters_upper_share(window):
    # White noise has the same expected power in every frequency bin (with or without the Hann window:
    # E|FFT(w·n)|² = σ² Σ w² at every frequency), so the upper-half share is the share of the bins of the
    # disc ρ ≤ 1 lying at ρ > 1/2: the area ratio (π − π/4)/π = 3/4, up to the discrete grid.
    noise = torch.randn(4, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    energy = D.band_energy(noise, window=window)
    assert D.upper_share(energy).mean().item() == pytest.approx(0.75, abs=0.01)
    # The spatial mean is removed first: an offset (a latent channel's shift) changes nothing.
    assert torch.allclose(D.band_energy(noise + 5, window=window), energy, rtol=1e-5)
    rel = D.relative_power(energy, D.band_bins(64, 64)).mean((0, 1))
    assert rel.shape == (D.BANDS,) and ((rel > 0.9) & (rel < 1.1)).all(), rel


def test_a_cosine_puts_all_its_energy_in_its_band():
    # Without a window, cos(2π k x / n) has power only at ±k/n cycles per sample: ρ = (k/n)/0.5.
    n = 64
    x = torch.arange(n, dtype=torch.float64)
    for k, band in ((8, 1), (24, 5)):  # ρ = 0.25 (in band (1/8, 2/8]) and 0.75 (in (5/8, 6/8])
        wave = torch.cos(2 * math.pi * k * x / n).expand(1, 1, n, n)
        energy = D.band_energy(wave, window=False)[0, 0]
        assert energy[band].item() == pytest.approx(energy.sum().item(), rel=1e-9)
        assert D.upper_share(energy).item() == pytest.approx(0.0 if band < 4 else 1.0, abs=1e-9)


def test_a_smooth_image_decays():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.stack([torch.exp(-(xx.square() + yy.square()) * 3), torch.sin(2 * xx + yy), xx * yy])[None]
    energy = D.band_energy(smooth)
    assert (D.upper_share(energy) < 0.01).all(), D.upper_share(energy)
    rel = D.relative_power(energy, D.band_bins(64, 64)).mean((0, 1))
    assert rel[0] > 100 * rel[-1] and (rel[1:] < rel[:-1]).sum() >= D.BANDS - 2, rel


def test_band_index_covers_the_disc_only():
    index = D.band_index(16, 16)
    assert index[0, 0] == 0 and index[0, 8] == D.BANDS - 1  # DC; (0, Nyquist)
    assert index[8, 8] == -1  # the corner, ρ = √2
    assert D.band_bins(16, 16).sum() == (index >= 0).sum()


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def test_area_resampling_is_exact_box_averaging():
    assert torch.equal(D.area_matrix(4, 3), torch.tensor([[0.75, 0.25, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.25, 0.75]]))
    assert torch.allclose(D.area_matrix(10, 7, torch.float64).sum(1), torch.ones(7, dtype=torch.float64))
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(D.area_resize(x, (8, 12)), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(D.area_resize(x, (4, 6)).mean((-2, -1)), x.mean((-2, -1)), atol=1e-6)  # mean kept


def test_transforms_shapes_and_errors():
    x = torch.arange(2 * 8 * 12, dtype=torch.float32).view(1, 2, 8, 12)
    assert D.transform(x, "scale_0.5").shape == (1, 2, 4, 6)
    assert D.transform(x, "scale_0.75").shape == (1, 2, 6, 9)
    assert D.transform(x, "rotate_90").shape == (1, 2, 12, 8)
    assert torch.equal(D.transform(x, "rotate_90")[0, 0, 0], x[0, 0, :, -1])  # counter-clockwise
    assert torch.equal(D.transform(x, "flip_horizontal")[..., 0], x[..., -1])
    with pytest.raises(ValueError, match="multiples of 4"):
        D.transform(x[..., :10], "scale_0.75")
    with pytest.raises(ValueError, match="unknown transform"):
        D.transform(x, "shear")
    assert D.center_crop_multiple(torch.zeros(3, 70, 45), 32).shape == (3, 64, 32)
    assert D.center_crop_multiple(torch.zeros(3, 70, 20), 32) is None


# --------------------------------------------------------------------------------------------------
# Equivariance
# --------------------------------------------------------------------------------------------------


def _pool(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, FACTOR)


def _upsample(z: torch.Tensor) -> torch.Tensor:
    return F.interpolate(z, scale_factor=FACTOR, mode="nearest")


def _binary(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """±1 values: every average, box weight and product below is then exact in float32."""
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


def _cell_constant(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """An image constant on each 8×8 latent cell (what average pooling loses nothing of)."""
    b, c, h, w = shape
    return _upsample(_binary((b, c, h // FACTOR, w // FACTOR), seed))


def test_equivariant_autoencoder_has_a_gap_of_exactly_zero():
    # Average pooling commutes with flips, 90° rotations and the 1/2 box resize of any image; with the
    # 3/4 box resize only for images constant on the latent cells (a 3/4 latent sample straddles cells).
    # Nearest upsampling commutes with all four. Both paths then give the same decoded image bit for bit.
    cases = [(_binary((2, 3, 64, 96), 0), ("flip_horizontal", "rotate_90", "scale_0.5")),
             (_cell_constant((2, 3, 64, 96), 1), ("scale_0.5", "scale_0.75"))]
    for x, names in cases:
        for name in names:
            via_latent, via_image = D.equivariance_psnrs(_pool, _upsample, x, _pool(x), name)
            assert torch.isfinite(via_latent).all(), name
            assert torch.equal(via_latent, via_image), (name, via_latent, via_image)
    # The test can fail: an encoder that is not equivariant (pooling a shifted image) gives a gap.
    x = _binary((1, 3, 64, 64), 2)
    shifted = lambda images: _pool(images.roll(1, -1))  # noqa: E731
    via_latent, via_image = D.equivariance_psnrs(shifted, _upsample, x, shifted(x), "rotate_90")
    assert not torch.equal(via_latent, via_image)


class _PoolEncoder(torch.nn.Module):
    """Encoder of an equivariant-by-construction VAE: posterior mean = 8×8 average of RGB + their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the model must have a parameter (dtype, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool2d(x, FACTOR)
        mean = torch.cat([mean, mean.mean(1, keepdim=True)], 1)  # 4 latent channels, as the config says
        return torch.cat([mean, torch.full_like(mean, -30.0)], 1)  # (mean, logvar)


class _UpsampleDecoder(torch.nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z[:, :3], scale_factor=FACTOR, mode="nearest")


@pytest.fixture
def pooled_codec() -> Codec:
    """The `test` preset with its networks replaced by average pooling and nearest upsampling."""
    from sdvae.model.build import build_preset

    vae = build_preset("test")
    vae.encoder, vae.decoder = _PoolEncoder(), _UpsampleDecoder()
    vae.quant_conv = vae.post_quant_conv = None
    return Codec(vae)


def _save(path: Path, x: torch.Tensor) -> None:
    Image.fromarray(((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(path)


def test_gap_through_the_engine_is_zero_for_the_pooled_model_and_not_for_a_trained_like_one(
        pooled_codec, codec, folder, tmp_path):
    root = tmp_path / "binary"
    root.mkdir()
    _save(root / "a_any.png", _binary((1, 3, 64, 96), 0))  # 0/255 pixels: exactly ±1 after the protocol
    _save(root / "b_cells.png", _cell_constant((1, 3, 64, 96), 1))
    report = evaluate_source(pooled_codec, open_source(str(root)), _settings(batch_size=1), model_ref="pooled",
                             progress=False)
    rows = {row["name"]: row for row in report["per_image"]}
    for name in ("flip_horizontal", "rotate_90", "scale_0.5"):
        assert rows["a_any.png"][f"gap_{name}"] == 0.0, name
    for name in ("scale_0.5", "scale_0.75"):
        assert rows["b_cells.png"][f"gap_{name}"] == 0.0, name

    # A random `test` VAE is not equivariant: every gap is clearly away from 0.
    report = evaluate_source(codec, open_source(str(folder)), _settings(), model_ref="test", progress=False)
    section = report["metrics"]["diffusability"]
    for name in D.TRANSFORMS:
        eq = section["equivariance"][name]
        assert eq["images"] == 3
        gaps = [row[f"gap_{name}"] for row in report["per_image"]]
        assert max(abs(g) for g in gaps) > 0.01, (name, gaps)
        assert eq["gap"]["mean"] == pytest.approx(eq["psnr_image_tau"]["mean"] - eq["psnr_latent_tau"]["mean"])


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def test_statistics_of_latents_with_known_moments():
    gen = torch.Generator().manual_seed(0)
    n = (8, 128, 128)
    gauss = torch.randn(n, generator=gen)
    uniform = (torch.rand(n, generator=gen) * 2 - 1) * math.sqrt(3)  # std 1, excess kurtosis -1.2
    # ±2 with probability 1/8 each, else 0: std 1, kurtosis E z⁴/σ⁴ = 16/4 = 4, excess 1 (light sampling noise).
    sparse = 2 * torch.sign(torch.rand(n, generator=gen) - 0.5) * (torch.rand(n, generator=gen) < 0.25)
    mixed = 0.6 * gauss + 0.8 * torch.randn(n, generator=gen)  # correlation 0.6 with channel 0, std 1
    z = torch.stack([2 + 3 * gauss, uniform, sparse, mixed], 1)  # (8, 4, 128, 128)
    # Added over two batches, as the engine does.
    halves = [D.moment_sums(part) for part in z.split(4)]
    stats = D.latent_statistics({k: halves[0][k] + halves[1][k] for k in halves[0]})
    assert stats["positions"] == 8 * 128 * 128
    assert stats["mean"] == pytest.approx([2, 0, 0, 0], abs=0.03)
    assert stats["std"] == pytest.approx([3, 1, 1, 1], abs=0.02)
    assert stats["excess_kurtosis"] == pytest.approx([0, -1.2, 1, 0], abs=0.05)
    corr = torch.tensor(stats["correlation"], dtype=torch.float64)
    assert torch.allclose(corr.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert corr[0, 3].item() == pytest.approx(0.6, abs=0.02) and corr[1, 2].abs() < 0.02
    assert stats["max_abs_correlation"] == pytest.approx(corr[0, 3].item())
    assert stats["mean_spread"] == pytest.approx(max(stats["mean"]) - min(stats["mean"]))
    assert stats["std_spread"] == pytest.approx(max(stats["std"]) - min(stats["std"]))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def test_report_section_protocol_and_summary(codec, folder):
    report = evaluate_source(codec, open_source(str(folder)), _settings(resolution=32), model_ref="test",
                             progress=False)
    data = json.loads(report_json(report))
    section = data["metrics"]["diffusability"]
    assert set(section) == {"available", "spectrum", "equivariance", "statistics"}
    for side in ("latent", "image"):
        share = section["spectrum"][side]["upper_share"]["mean"]
        assert 0 < share < 1 and len(section["spectrum"][side]["relative_power"]) == D.BANDS
    assert len(section["spectrum"]["latent"]["upper_share_per_channel"]) == 4
    assert len(section["statistics"]["correlation"]) == 4 and section["statistics"]["positions"] == 3 * 4 * 4
    assert set(data["protocol"]["diffusability"]) == {"spectrum", "equivariance", "statistics"}
    lines = summary_lines(report)
    assert any(line.startswith("spectrum: ") for line in lines)
    assert sum(line.startswith("equivariance ") for line in lines) == 4
    # The latent statistics are those of the scaled posterior means (the `test` preset scales by 0.5).
    from sdvae.eval.engine import apply_protocol

    source = open_source(str(folder))
    z = torch.cat([codec.encode(apply_protocol(source.load(source.files.index(f"img{i}.png")),
                                               _settings(resolution=32))[None]).mean for i in range(3)])
    assert section["statistics"]["mean"] == pytest.approx((z * 0.5).double().mean((0, 2, 3)).tolist(), abs=1e-6)
    # Without the flag the report is unchanged.
    plain = evaluate_source(codec, open_source(str(folder)), _settings(resolution=32, limit=2, diffusability=False),
                            model_ref="test", progress=False)
    assert "diffusability" not in plain["metrics"] and "diffusability" not in plain["protocol"]
    assert "gap_rotate_90" not in plain["per_image"][0]
