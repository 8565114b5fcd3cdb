"""How learnable a latent space is for diffusion: spectrum, equivariance and statistics of the latents.

``sdvae eval --diffusability`` adds three groups of numbers to the reconstruction report. They measure
properties that published work ties to how fast a diffusion model learns a VAE's latents, beyond how
well the VAE reconstructs:

* **spectrum** (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"): the share of
  the scaled latents' energy in the upper half of the frequency band, next to the same share for the
  image averaged onto the latent grid. Latents with more high-frequency energy than the image fight
  diffusion's coarse-to-fine generation.
* **equivariance** (EQ-VAE, Kouzelis et al. 2025): for a transform τ, PSNR of ``decode(τ(encode(x)))``
  against ``τ(x)`` next to ``decode(encode(τ(x)))`` against ``τ(x)``; their difference (the gap) is
  how much worse the decoder does on transformed latents than on latents of transformed images.
* **statistics** (VA-VAE, Yao et al. 2025, and the latent-diffusion proof of this repository): per-channel
  mean and std of the scaled latents, inter-channel correlation and excess kurtosis: what a diffusion
  model's N(0, I) noise has to be matched to.

Everything here is a function of tensors (or of ``encode``/``decode`` callables); the evaluation engine
(:mod:`sdvae.eval.engine`) calls :func:`measure_batch` per batch and :func:`summarise` once at the end.
The exact definitions the report records are :data:`DEFINITIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sdvae.images.transforms import SCALES as SCALES
from sdvae.images.transforms import TRANSFORMS as TRANSFORMS
from sdvae.images.transforms import area_matrix as area_matrix
from sdvae.images.transforms import area_resize as area_resize
from sdvae.images.transforms import transform as transform
from sdvae.metrics.pixel import psnr

BANDS = 8  # radial bands of width Nyquist/8 over [0, Nyquist]
UPPER_FROM_BAND = BANDS // 2  # the upper half band: Nyquist/2 < ρ ≤ Nyquist
EQ_CELLS = 4  # images are cropped to multiples of 4 latent cells, so every scale lands on whole cells

DEFINITIONS = {
    "spectrum": (
        "per image and channel: the spatial mean removed, times a separable periodic Hann window, |FFT2|^2; "
        "radial frequency rho = sqrt(fy^2 + fx^2) / Nyquist (fy, fx in cycles per sample, Nyquist 0.5); bins "
        "with rho > 1 (the corners) are left out; upper_share = energy at 0.5 < rho <= 1 over energy at "
        "rho <= 1 (white noise: the bin-count ratio, about 0.75). latent: the scaled latents (the diffusion "
        "model's input) of the posterior mean; image: the input (all channels, [-1,1]) area-averaged onto the "
        "same grid, one value per scaled-latent cell; sides cropped to whole cells. pooled: mean of the channel "
        "shares; then mean and population std over images. relative_power: per band of width Nyquist/8, the "
        "mean power per frequency bin over the mean over all bins rho <= 1 (1 everywhere for white noise), "
        "averaged over channels and images"
    ),
    "equivariance": (
        "posterior means; images center-cropped to multiples of 4 latent cells (4f pixels); tau acts alike on "
        "images (B,C,H,W) and unscaled latents (B,C,h,w): scale_0.5 / scale_0.75 = exact box (area) "
        "resampling to 1/2 or 3/4 of each side (each output sample the average of the input over its "
        "footprint, partial samples weighted by overlap), rotate_90 = torch.rot90 counter-clockwise, "
        "flip_horizontal = mirror left-right. psnr_latent_tau = PSNR(tau(x), decode(tau(encode(x)))); "
        "psnr_image_tau = PSNR(tau(x), decode(encode(tau(x)))); both on [0,1] after clamping, not rounded "
        "to 8 bits (tau(x) is a resampled image, not a saved file); gap = psnr_image_tau - psnr_latent_tau "
        "(0 for an equivariant autoencoder; positive: transformed latents decode worse); mean and "
        "population std over images"
    ),
    "statistics": (
        "over every position of every image's scaled posterior-mean latents (float64 sums): per channel "
        "mean, population std and excess kurtosis m4/m2^2 - 3 (0 for a Gaussian); mean_spread and "
        "std_spread = max - min over channels; correlation = Pearson correlation matrix of the channels, "
        "max_abs_correlation its largest off-diagonal |entry|"
    ),
}


# --------------------------------------------------------------------------------------------------
# The transforms τ (sdvae.images.transforms) and cropping
# --------------------------------------------------------------------------------------------------


def center_crop_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor | None:
    """The central crop of (..., H, W) whose sides are the largest multiples of ``multiple``; None if empty."""
    height, width = x.shape[-2:]
    h, w = height // multiple * multiple, width // multiple * multiple
    if h == 0 or w == 0:
        return None
    top, left = (height - h) // 2, (width - w) // 2
    return x[..., top:top + h, left:left + w]


# --------------------------------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------------------------------


def radial_frequency(height: int, width: int) -> torch.Tensor:
    """(H, W) radial frequency of each FFT2 bin in units of Nyquist: sqrt(fy² + fx²)/0.5 (corners up to √2)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(width, dtype=torch.float64).view(1, -1)
    return torch.sqrt(fy.square() + fx.square()) / 0.5


def band_index(height: int, width: int, bands: int = BANDS) -> torch.Tensor:
    """(H, W) band of each FFT2 bin: k for k/bands < ρ ≤ (k+1)/bands (the DC bin in band 0); −1 for ρ > 1."""
    rho = radial_frequency(height, width)
    index = (torch.ceil(rho * bands) - 1).clamp_min(0).long()
    return torch.where(rho <= 1 + 1e-12, index.clamp_max(bands - 1), torch.full_like(index, -1))


def band_energy(x: torch.Tensor, bands: int = BANDS, window: bool = True) -> torch.Tensor:
    """Radial band energies of each channel's power spectrum.

    Each (h, w) map has its spatial mean removed and, if ``window``, is multiplied by a separable
    periodic Hann window (less leakage from the non-periodic borders; white noise stays flat in
    expectation); the power |FFT2|² is summed over the bins of each band (:func:`band_index`).

    Args:
        x: (B,C,h,w) float tensor, any range.
        bands: number of bands of width Nyquist/bands.
        window: apply the Hann window.

    Returns:
        (B,C,bands) float64 energies (bins beyond Nyquist, the corners, left out).
    """
    x = x.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    height, width = x.shape[-2:]
    if window:
        wy = torch.hann_window(height, periodic=True, dtype=torch.float64, device=x.device).view(-1, 1)
        wx = torch.hann_window(width, periodic=True, dtype=torch.float64, device=x.device).view(1, -1)
        x = x * (wy * wx)
    power = torch.fft.fft2(x).abs().square().flatten(-2)
    index = band_index(height, width, bands).flatten().to(x.device)
    keep = index >= 0
    out = torch.zeros((*power.shape[:-1], bands), dtype=torch.float64, device=x.device)
    return out.index_add_(-1, index[keep], power[..., keep]).cpu()


def band_bins(height: int, width: int, bands: int = BANDS) -> torch.Tensor:
    """(bands,) number of FFT2 bins in each band of an (H, W) grid."""
    index = band_index(height, width, bands).flatten()
    return torch.bincount(index[index >= 0], minlength=bands).double()


def upper_share(energy: torch.Tensor, from_band: int = UPPER_FROM_BAND) -> torch.Tensor:
    """Share of the energy in bands ``from_band``… (the upper half band by default).

    Args:
        energy: (..., bands) from :func:`band_energy`.

    Returns:
        (...) in [0, 1]; NaN where the total is 0 (a constant map).
    """
    total = energy.sum(-1)
    return energy[..., from_band:].sum(-1) / total


def relative_power(energy: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Radially averaged power relative to the mean over the disc ρ ≤ 1: 1 in every band for white noise.

    Args:
        energy: (..., bands) from :func:`band_energy`.
        bins: (bands,) from :func:`band_bins` for the same grid (or broadcastable (..., bands) counts).

    Returns:
        (..., bands); NaN for a band without bins (grids of a few samples).
    """
    mean_all = energy.sum(-1, keepdim=True) / bins.sum(-1, keepdim=True)
    return (energy / bins) / mean_all


# --------------------------------------------------------------------------------------------------
# Equivariance
# --------------------------------------------------------------------------------------------------


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def equivariance_psnrs(encode: Callable[[torch.Tensor], torch.Tensor],
                       decode: Callable[[torch.Tensor], torch.Tensor],
                       x: torch.Tensor, z: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR of the two ways to get τ(x) back through an autoencoder.

    Args:
        encode: (B,C,H,W) images in [-1, 1] → (B,c,H/f,W/f) latents (posterior means).
        decode: latents → (B,C,H,W) images, nominally in [-1, 1].
        x: (B,C,H,W) images in [-1, 1], sides multiples of 4f (see :func:`center_crop_multiple`).
        z: ``encode(x)``.
        name: τ, one of :data:`TRANSFORMS`.

    Returns:
        (psnr_latent, psnr_image), each (B,) in dB: PSNR(τ(x), decode(τ(z))) and
        PSNR(τ(x), decode(encode(τ(x)))) on [0, 1] after clamping.
    """
    target = transform(x, name)
    via_latent = decode(transform(z, name))
    via_image = decode(encode(target))
    reference = _unit(target)
    return psnr(reference, _unit(via_latent)), psnr(reference, _unit(via_image))


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def moment_sums(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums that add over batches to the moments of each channel and the channels' covariance.

    Args:
        z: (B,C,h,w) latents.

    Returns:
        float64 CPU tensors: ``n`` (1,) positions per channel, ``s1``…``s4`` (C,) sums of z¹…z⁴,
        ``cross`` (C,C) sum of z zᵀ over positions.
    """
    flat = z.detach().double().transpose(0, 1).reshape(z.shape[1], -1).cpu()  # (C, N)
    return {"n": torch.tensor([flat.shape[1]], dtype=torch.float64),
            "s1": flat.sum(1), "s2": flat.square().sum(1), "s3": flat.pow(3).sum(1), "s4": flat.pow(4).sum(1),
            "cross": flat @ flat.T}


def latent_statistics(sums: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-channel moments and the correlation matrix from added :func:`moment_sums`.

    Returns:
        ``mean``, ``std``, ``excess_kurtosis`` (lists of C floats), ``mean_spread``, ``std_spread`` (max −
        min over channels), ``correlation`` (C×C nested list), ``max_abs_correlation`` (largest
        off-diagonal |entry|; 0 for one channel), ``positions`` (latent positions per channel).
    """
    n = float(sums["n"].reshape(-1)[0])
    m1, e2, e3, e4 = (sums[k] / n for k in ("s1", "s2", "s3", "s4"))
    var = (e2 - m1.square()).clamp_min(0)
    m4 = e4 - 4 * m1 * e3 + 6 * m1.square() * e2 - 3 * m1.pow(4)
    kurtosis = m4 / var.square() - 3
    std = var.sqrt()
    cov = sums["cross"] / n - torch.outer(m1, m1)
    corr = cov / torch.outer(std, std)
    channels = m1.shape[0]
    off = corr[~torch.eye(channels, dtype=torch.bool)]
    return {
        "positions": int(n),
        "mean": m1.tolist(), "std": std.tolist(), "excess_kurtosis": kurtosis.tolist(),
        "mean_spread": float(m1.max() - m1.min()), "std_spread": float(std.max() - std.min()),
        "correlation": corr.tolist(),
        "max_abs_correlation": float(off.abs().max()) if off.numel() else 0.0,
    }


# --------------------------------------------------------------------------------------------------
# Per batch and per report
# --------------------------------------------------------------------------------------------------


def measure_batch(x: torch.Tensor, z: torch.Tensor, *, encode: Callable[[torch.Tensor], torch.Tensor],
                  decode: Callable[[torch.Tensor], torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor],
                  factor: int, patch: int = 1) -> dict[str, torch.Tensor]:
    """Every per-image diffusability column of one batch (what :func:`summarise` reduces).

    Args:
        x: (B,C,H,W) images in [-1, 1].
        z: (B,c,ceil(H/f),ceil(W/f)) their unscaled posterior means (``encode(x)``, padded sides included).
        encode, decode: as in :func:`equivariance_psnrs` (unscaled latents).
        scale: unscaled → scaled latents (:func:`sdvae.latents.scaling.scale_latents` for the model).
        factor: the downsampling factor f.
        patch: unscaled latent cells per scaled cell per side (2 for FLUX.2's patchify, else 1).

    Returns:
        tensors with a leading batch axis: ``spectrum_latent`` (B,c·patch²,BANDS) and ``spectrum_image``
        (B,C,BANDS) band energies and ``spectrum_grid`` (B,2) the scaled-latent (h, w) (NaN energies and
        a 0×0 grid for an image smaller than one scaled cell); ``moments_*`` (1,...) :func:`moment_sums`
        of the batch (absent for such images); for each τ ``eq_latent_<τ>`` / ``eq_image_<τ>`` (B,) PSNRs
        (NaN when the crop to multiples of 4f is empty).
    """
    cell = factor * patch
    batch = x.shape[0]
    height, width = x.shape[-2] // cell, x.shape[-1] // cell  # whole scaled-latent cells
    out: dict[str, torch.Tensor] = {"spectrum_grid": torch.tensor([[height, width]] * batch, dtype=torch.float64)}
    if height and width:
        scaled = scale(z[..., :height * patch, :width * patch].float())
        image = area_resize(x[..., :height * cell, :width * cell].double(), (height, width))
        out["spectrum_latent"] = band_energy(scaled)
        out["spectrum_image"] = band_energy(image)
        out.update({f"moments_{k}": v[None] for k, v in moment_sums(scaled).items()})
    else:
        out["spectrum_latent"] = torch.full((batch, z.shape[1] * patch * patch, BANDS), math.nan, dtype=torch.float64)
        out["spectrum_image"] = torch.full((batch, x.shape[1], BANDS), math.nan, dtype=torch.float64)
    cropped = center_crop_multiple(x, EQ_CELLS * factor)
    for name in TRANSFORMS:
        if cropped is None:
            nan = torch.full((batch,), math.nan)
            out[f"eq_latent_{name}"], out[f"eq_image_{name}"] = nan, nan
            continue
        zc = z if cropped.shape == x.shape else encode(cropped)
        out[f"eq_latent_{name}"], out[f"eq_image_{name}"] = equivariance_psnrs(encode, decode, cropped, zc, name)
    return out


def _mean_std(values: torch.Tensor) -> dict[str, float]:
    """Mean and population std over the non-NaN values (NaN for none)."""
    values = values.double()
    values = values[~torch.isnan(values)]
    if not values.numel():
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(values.mean()), "std": float(values.std(correction=0))}


def _spectrum_side(energy: torch.Tensor, bins: torch.Tensor) -> dict[str, Any]:
    """One side (latent or image) of the spectrum section from (N,C,BANDS) energies and (N,BANDS) bin counts."""
    shares = upper_share(energy)  # (N, C)
    rel = relative_power(energy, bins[:, None, :]).nanmean(1)  # (N, BANDS), channels averaged
    return {"upper_share": _mean_std(shares.nanmean(1)),
            "upper_share_per_channel": [_mean_std(shares[:, c]) for c in range(shares.shape[1])],
            "relative_power": rel.nanmean(0).tolist()}


def summarise(data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The report's ``diffusability`` section from the :func:`measure_batch` columns concatenated over batches.

    Returns:
        ``{"available": True, "spectrum": ..., "equivariance": ..., "statistics": ...}`` (see
        :data:`DEFINITIONS`; a part that no image could feed is ``{"available": False, "reason": ...}``).
    """
    section: dict[str, Any] = {"available": True}
    grids = data["spectrum_grid"].long()
    measured = (grids > 0).all(1)
    if measured.any():
        bins = torch.stack([band_bins(int(h), int(w)) if h else torch.full((BANDS,), math.nan)
                            for h, w in grids.tolist()])
        spectrum: dict[str, Any] = {"available": True, "images": int(measured.sum()),
                                    "latent": _spectrum_side(data["spectrum_latent"], bins),
                                    "image": _spectrum_side(data["spectrum_image"], bins)}
        image_share = spectrum["image"]["upper_share"]["mean"]
        spectrum["latent_over_image"] = spectrum["latent"]["upper_share"]["mean"] / image_share \
            if image_share > 0 else math.nan
        section["spectrum"] = spectrum
        sums = {k[len("moments_"):]: v.sum(0) for k, v in data.items() if k.startswith("moments_")}
        section["statistics"] = {"available": True, **latent_statistics(sums)}
    else:
        reason = "no image spans a whole scaled-latent cell"
        section["spectrum"] = {"available": False, "reason": reason}
        section["statistics"] = {"available": False, "reason": reason}
    equivariance: dict[str, Any] = {}
    for name in TRANSFORMS:
        a, b = data[f"eq_latent_{name}"], data[f"eq_image_{name}"]
        equivariance[name] = {"psnr_latent_tau": _mean_std(a), "psnr_image_tau": _mean_std(b),
                              "gap": _mean_std(b - a), "images": int((~torch.isnan(a)).sum())}
    section["equivariance"] = equivariance
    return section


def per_image(data: dict[str, torch.Tensor], i: int) -> dict[str, float]:
    """Image ``i``'s diffusability figures for the report's ``per_image`` rows (NaN where not measured)."""
    row = {"latent_upper_share": float(upper_share(data["spectrum_latent"][i]).nanmean()),
           "image_upper_share": float(upper_share(data["spectrum_image"][i]).nanmean())}
    for name in TRANSFORMS:
        row[f"gap_{name}"] = float(data[f"eq_image_{name}"][i] - data[f"eq_latent_{name}"][i])
    return row
