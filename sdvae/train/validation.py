"""Training-time validation: PSNR/SSIM of mean reconstructions and an original|reconstruction grid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from sdvae.atomic import atomic_file
from sdvae.latents.stats import LatentStats, posterior_stats, write_bn_statistics, write_scaling_config
from sdvae.metrics.pixel import psnr, quantize, ssim
from sdvae.model.family import is_flux2


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, batches: Iterable[dict | torch.Tensor], device: torch.device | str,
                           max_pairs: int = 8) -> tuple[dict[str, float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Mean PSNR/SSIM of posterior-mean reconstructions (quantized to 8 bits, as a saved PNG would be).

    Args:
        vae: model in eval mode (fp32).
        batches: iterable of (B,C,H,W) tensors in [-1,1] or dicts with such a ``"pixels"`` entry.
        device: where to run the model.
        max_pairs: how many (original, reconstruction) pairs to return for a preview grid.

    Returns:
        ({"psnr": dB, "ssim": ..., "images": n} over all C channels, [(original, recon) (C,H,W) in [0,1]] up to
        max_pairs).
    """
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        images = batch["pixels"] if isinstance(batch, dict) else batch
        if images is None or len(images) == 0:
            continue
        x = images.to(device, torch.float32)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        a, b = quantize(x).cpu(), quantize(recon).cpu()
        scores["psnr"].append(psnr(a, b))
        scores["ssim"].append(ssim(a, b))
        pairs.extend(zip(a, b, strict=True))
        del pairs[max_pairs:]
    n = sum(len(s) for s in scores["psnr"])
    if n == 0:
        return {"images": 0.0}, pairs
    return {k: float(torch.cat(v).mean()) for k, v in scores.items()} | {"images": float(n)}, pairs


def save_comparison_grid(pairs: list[tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> torch.Tensor:
    """Write an original|reconstruction grid (one pair per row) as PNG, atomically.

    Args:
        pairs: (original, reconstruction) images (C,H,W) in [0,1], all the same size (C 1, 3 or 4).
        path: PNG destination.

    Returns:
        The grid (3,H',W') in [0,1] (e.g. for TensorBoard): grayscale pairs become grey RGB (torchvision's
        ``make_grid``); RGBA pairs give a (4,H',W') grid, written as an RGBA PNG.
    """
    from torchvision.utils import make_grid, save_image

    flat = [img for pair in pairs for img in pair]
    grid = make_grid(torch.stack(flat), nrow=2, padding=2, pad_value=1.0)
    with atomic_file(path) as tmp:
        save_image(grid, tmp, format="png")
    return grid


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKL, batches: Iterable[dict | torch.Tensor], device: torch.device | str
                         ) -> LatentStats:
    """Posterior latent statistics of ``vae``'s encoder over ``batches`` (``sdvae latent-stats``' math).

    For a FLUX.2 VAE, of the 2×2-patchified latents (the channels its BatchNorm normalises).

    Args:
        vae: model in eval mode (fp32).
        batches: as for :func:`reconstruction_metrics`.
        device: where to run the encoder.
    """

    def posteriors():
        for batch in batches:
            images = batch["pixels"] if isinstance(batch, dict) else batch
            if images is None or len(images) == 0:
                continue
            dist = vae.encode(images.to(device, torch.float32)).latent_dist
            yield dist.mean, dist.logvar

    return posterior_stats(posteriors(), patch=is_flux2(vae.config))


def write_measured_scaling(folder: str | Path, stats: LatentStats) -> dict:
    """Write ``stats``' factors into the diffusers folder's config.json, in the form the model uses.

    ``scaling_factor`` always; ``shift_factor`` only if the model has one (SD3/FLUX style); per-channel
    ``latents_mean``/``latents_std`` instead if the model uses those. For FLUX.2: the patchified channel
    means and variances into the weights' BatchNorm running buffers (config.json unchanged). Returns the
    keys written.
    """
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    if is_flux2(config):
        return write_bn_statistics(folder, stats)[1]
    per_channel = config.get("latents_mean") is not None
    return write_scaling_config(folder, stats, per_channel=per_channel,
                                shift=config.get("shift_factor") is not None)[1]
