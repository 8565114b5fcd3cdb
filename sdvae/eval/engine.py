"""Reconstruction quality of a VAE over a set of images (validation during training, ``sdvae eval``).

:func:`reconstruction_metrics` is the quick PSNR/SSIM of training validation. :func:`evaluate_source`
is ``sdvae eval``: the figures of the published VAE tables (PSNR and SSIM as mean ± std, LPIPS, rFID)
for any model and image collection under a stated protocol, plus the likelihood bounds of
:mod:`sdvae.eval.elbo`. Metrics whose network weights are not on disk (LPIPS backbone, FID Inception) are
reported as unavailable with the reason; nothing is downloaded at run time.

Images are read to the model's image channels (:mod:`sdvae.images.channels`: 1 grayscale, 3 RGB, 4 RGBA).
PSNR, SSIM and the likelihood bounds cover every channel (an RGBA model's alpha included); LPIPS and rFID,
whose networks take RGB, see the RGB view (:func:`~sdvae.images.channels.rgb_view`: grayscale repeated to
three channels, RGBA without its alpha).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from sdvae.errors import UserError
from sdvae.eval.metric_models import load_fid_metric, load_lpips_metric
from sdvae.images.channels import describe_channels, rgb_view
from sdvae.images.resize import center_crop, resize_shorter
from sdvae.metrics.pixel import psnr, quantize, ssim
from sdvae.progress import Progress

if TYPE_CHECKING:
    from sdvae.codec.codec import Codec
    from sdvae.images.sources import ImageSource


EVAL_FORMAT = "sdvae-eval/1"
MAX_SKIPPED_LISTED = 20
MIN_SIDE = 11  # SSIM's Gaussian window


@dataclass
class EvalSettings:
    """The evaluation protocol (everything that changes a figure, recorded in the report).

    Attributes:
        resolution: resize the shorter side to this (antialiased bicubic); None: full resolution.
        center_crop: then crop the central ``resolution``² square (the model-card protocol).
        batch_size: images per model call (same-size images only are batched together).
        limit: evaluate only the first N images of the source.
        iw_samples: K posterior samples for the ELBO and importance-weighted bound.
        sigma: fixed likelihood scale on the [-1, 1] scale; None: fitted on :data:`sdvae.eval.elbo.SIGMA_GRID`.
        seed: seed of the posterior samples (each image has its own generator, see
            :func:`sdvae.eval.elbo.image_generator`).
        lpips: compute LPIPS (needs the backbone weights locally).
        lpips_net: LPIPS backbone, ``vgg`` | ``alex`` | ``squeeze``.
        lpips_weights: explicit backbone file; "" looks in the torch hub cache.
        fid: compute rFID (needs the Inception weights locally).
        inception_weights: explicit Inception file; "" looks in the torch hub cache.
        workers: DataLoader processes decoding images (0: the main process).
        diffusability: also measure the latents' spectrum, equivariance and statistics
            (:mod:`sdvae.eval.diffusability`; about 3 extra encodes and 6 decodes per image).
    """

    resolution: int | None = 256
    center_crop: bool = True
    batch_size: int = 8
    limit: int | None = None
    iw_samples: int = 1
    sigma: float | None = None
    seed: int = 0
    lpips: bool = True
    lpips_net: str = "vgg"
    lpips_weights: str = ""
    fid: bool = True
    inception_weights: str = ""
    workers: int = 0
    diffusability: bool = False

    def check(self) -> None:
        """Raise :class:`UserError` for values no evaluation can run with."""
        if self.resolution is not None and self.resolution < MIN_SIDE:
            raise UserError(f"--resolution must be at least {MIN_SIDE} pixels (SSIM's window), got {self.resolution}")
        for name, value in (("--batch-size", self.batch_size), ("--iw", self.iw_samples)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.sigma is not None and not (0 < self.sigma < math.inf):
            raise UserError(f"--sigma must be a positive number (on the [-1,1] scale, e.g. 0.05), got {self.sigma}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")

    def describe_crop(self) -> str:
        if self.resolution is None:
            return "full resolution (sides padded to the downsampling factor by reflection, then cropped back)"
        crop = f", center crop {self.resolution}×{self.resolution}" if self.center_crop else ", no crop"
        return f"shorter side resized to {self.resolution} (bicubic, antialiased){crop}"


def apply_protocol(image: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    """Apply the protocol's resize/crop and round to the 8-bit grid (the data whose likelihood is scored).

    Args:
        image: (C,H,W) in [-1, 1].
        settings: the protocol.

    Returns:
        (C,H',W') float32 in [-1, 1], values v/127.5 − 1 for integer v (a resized image is re-quantized
        as if saved as an 8-bit file, so model, metrics and likelihood all see the same 8-bit image).
    """
    if settings.resolution is not None:
        image = resize_shorter(image, settings.resolution)
        if settings.center_crop:
            image = center_crop(image, settings.resolution)
    return quantize(image[None])[0] * 2 - 1


class _EvalItems(Dataset):
    """Source images after :func:`apply_protocol`; a bad image becomes an item with an ``error``."""

    def __init__(self, source: ImageSource, count: int, settings: EvalSettings, channels: int = 3):
        self.source, self.count, self.settings, self.channels = source, count, settings, channels

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.source.name(i)
        try:
            pixels = apply_protocol(self.source.load(i, self.channels), self.settings)
        except UserError as err:
            return {"index": i, "name": name, "pixels": None, "error": str(err)}
        if min(pixels.shape[-2:]) < MIN_SIDE:
            return {"index": i, "name": name, "pixels": None,
                    "error": f"{name}: {pixels.shape[-1]}×{pixels.shape[-2]} is below SSIM's {MIN_SIDE}-pixel window"}
        return {"index": i, "name": name, "pixels": pixels, "error": None}


def _items_as_they_are(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _batches(items: Iterable[dict[str, Any]], batch_size: int, skipped: list[dict[str, str]],
             on_item: Callable[[], None]) -> Iterator[list[dict[str, Any]]]:
    """Group consecutive same-size good items into batches; record bad ones in ``skipped``."""
    batch: list[dict[str, Any]] = []
    for item in items:
        on_item()
        if item["pixels"] is None:
            skipped.append({"name": item["name"], "reason": item["error"]})
            continue
        if batch and (len(batch) == batch_size or batch[0]["pixels"].shape != item["pixels"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _stats(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {"mean": float(values.mean()), "std": float(values.std(correction=0))}


@torch.no_grad()
def evaluate_source(codec: Codec, source: ImageSource, settings: EvalSettings, *, model_ref: str,
                    progress: bool = True) -> dict[str, Any]:
    """Reconstruction metrics and likelihood bounds of one model on one image collection.

    PSNR/SSIM/LPIPS/rFID compare each 8-bit input with its 8-bit posterior-mean reconstruction; the
    ELBO and IW bound use posterior samples (see :mod:`sdvae.eval.elbo`). Images that cannot be read are
    skipped and counted, never fatal.

    Args:
        codec: the model, device, precision and tiling policy.
        source: the images (folder, dataset...).
        settings: the protocol (validated with :meth:`EvalSettings.check`).
        model_ref: how the user named the model (recorded).
        progress: report progress on stderr (a bar on a terminal, plain lines in logs).

    Returns:
        The report: ``format``, ``model``, ``data``, ``protocol``, ``metrics`` (mean ± population std
        of every figure, or ``{"available": False, "reason": ...}``; ``diffusability`` only when
        requested), ``per_image`` and ``seconds``.

    Raises:
        UserError: bad settings, an explicit weights file that is unusable, or no readable image.
    """
    from sdvae.eval.elbo import SIGMA_GRID
    from sdvae.model.info import config_hash, describe

    settings.check()
    start = time.perf_counter()
    device = codec.device
    lpips_model, lpips_info = load_lpips_metric(settings.lpips_net, settings.lpips_weights) if settings.lpips \
        else (None, "not requested (--no-lpips)")
    fid_metric, fid_info = load_fid_metric(settings.inception_weights) if settings.fid \
        else (None, "not requested (--no-fid)")
    if lpips_model is not None:
        lpips_model = lpips_model.to(device)
    if fid_metric is not None:
        fid_metric = fid_metric.to(device)
    sigmas = SIGMA_GRID if settings.sigma is None else (settings.sigma,)

    count = len(source) if settings.limit is None else min(settings.limit, len(source))
    data, names, skipped = _measure(codec, source, settings, count, sigmas, lpips_model, fid_metric, progress)
    metrics, per_image = _summarise(data, names, settings, sigmas, lpips_model, lpips_info, fid_metric, fid_info)

    facts = describe(codec.master)
    seconds = time.perf_counter() - start
    return {
        "format": EVAL_FORMAT,
        "model": {"ref": model_ref, "config_hash": config_hash(codec.master),
                  "downsampling_factor": facts["downsampling_factor"], "latent_channels": facts["latent_channels"],
                  "image_channels": codec.channels,
                  "parameters": facts["parameters"]["total"]},
        "data": {"ref": source.ref, "description": source.describe(), "images_in_source": len(source),
                 "limit": settings.limit, "evaluated": len(names), "skipped": len(skipped),
                 "skipped_examples": skipped[:MAX_SKIPPED_LISTED]},
        "protocol": _protocol(codec, settings, lpips_info if lpips_model is not None else None,
                              fid_info if fid_metric is not None else None, metrics["elbo"]["sigma_rule"]),
        "metrics": metrics,
        "notes": list(codec.notes),
        "per_image": per_image,
        "seconds": round(seconds, 3),
    }


def _measure(codec: Codec, source: ImageSource, settings: EvalSettings, count: int, sigmas: tuple[float, ...],
             lpips_model: Any, fid_metric: Any, progress: bool
             ) -> tuple[dict[str, torch.Tensor], list[str], list[dict[str, str]]]:
    """Encode, decode and score the first ``count`` images: per-image columns (``psnr``, ``ssim``, ``lpips``,
    the bound terms), the names evaluated, and the skipped inputs. ``fid_metric`` accumulates in place.

    Raises:
        UserError: no image could be evaluated.
    """
    from torch.utils.data import DataLoader

    from sdvae.eval.elbo import bound_terms, image_generator
    from sdvae.metrics.lpips import lpips_distance

    device = codec.device
    loader = DataLoader(_EvalItems(source, count, settings, codec.channels), batch_size=None, shuffle=False,
                        num_workers=settings.workers, collate_fn=_items_as_they_are)
    bar = Progress(count, "sdvae eval", enabled=progress)
    skipped: list[dict[str, str]] = []
    names: list[str] = []
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("psnr", "ssim", "lpips", "elbo", "iw", "distortion", "rate", "kl", "dims")}
    try:
        for batch in _batches(loader, settings.batch_size, skipped, lambda: bar.update(1)):
            x = torch.stack([item["pixels"] for item in batch])
            enc = codec.encode(x)
            recon = codec.decode(enc.mean, enc.size)
            a, b = quantize(x), quantize(recon)  # (B,C,H,W) in [0,1] on the 8-bit grid
            cols["psnr"].append(psnr(a, b))
            cols["ssim"].append(ssim(a, b))
            if lpips_model is not None:
                cols["lpips"].append(lpips_distance(lpips_model, rgb_view(a * 2 - 1).to(device),
                                                    rgb_view(b * 2 - 1).to(device)).cpu())
            if fid_metric is not None:
                fid_metric.update(rgb_view((a * 255).round().to(torch.uint8)).to(device), real=True)
                fid_metric.update(rgb_view((b * 255).round().to(torch.uint8)).to(device), real=False)
            gens = [image_generator(settings.seed, item["index"]) for item in batch]
            terms = bound_terms(codec, x, enc, sigmas, settings.iw_samples, gens)
            cols["elbo"].append(terms.elbo().T)
            cols["iw"].append(terms.iw_elbo().T)
            cols["distortion"].append(terms.distortion().T)
            cols["rate"].append(terms.rate())
            cols["kl"].append(terms.kl)
            cols["dims"].append(torch.full((len(batch),), terms.dims, dtype=torch.float64))
            if settings.diffusability:
                for key, value in _diffusability_columns(codec, x, enc).items():
                    cols.setdefault(key, []).append(value)
            names.extend(item["name"] for item in batch)
    finally:
        bar.close()
    if not names:
        first = f" (first: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"{source.ref}: none of the {count} images could be evaluated{first}")
    return {k: torch.cat(v) for k, v in cols.items() if v}, names, skipped


def _diffusability_columns(codec: Codec, x: torch.Tensor, enc: Any) -> dict[str, torch.Tensor]:
    """:func:`sdvae.eval.diffusability.measure_batch` of one batch through the codec (posterior means)."""
    from sdvae.eval.diffusability import measure_batch
    from sdvae.latents.scaling import scale_latents
    from sdvae.model.family import patch_factor

    return measure_batch(x, enc.mean, encode=lambda images: codec.encode(images).mean, decode=codec.decode,
                         scale=lambda z: scale_latents(z, codec.master), factor=codec.factor,
                         patch=patch_factor(codec.config))


def _summarise(data: dict[str, torch.Tensor], names: list[str], settings: EvalSettings, sigmas: tuple[float, ...],
               lpips_model: Any, lpips_info: str, fid_metric: Any, fid_info: str
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report's ``metrics`` (mean ± population std, or unavailable with the reason) and ``per_image`` rows."""
    from sdvae.eval import diffusability
    from sdvae.eval.elbo import summarize_bounds
    from sdvae.metrics.information import bits_per_dim

    metrics: dict[str, Any] = {
        "psnr": {"available": True, "unit": "dB", **_stats(data["psnr"])},
        "ssim": {"available": True, **_stats(data["ssim"])},
    }
    if lpips_model is not None:
        metrics["lpips"] = {"available": True, "net": settings.lpips_net, **_stats(data["lpips"])}
    else:
        metrics["lpips"] = {"available": False, "reason": lpips_info}
    if fid_metric is not None:
        try:
            metrics["rfid"] = {"available": True, "value": float(fid_metric.compute()), "images": len(names),
                               "note": "Frechet distance between the Inception features of the inputs and of the "
                               "reconstructions; biased upward on small sets (the model cards use 5,000 images)"}
        except RuntimeError as err:  # fewer than 2 images
            metrics["rfid"] = {"available": False, "reason": str(err).strip().splitlines()[0]}
    else:
        metrics["rfid"] = {"available": False, "reason": fid_info}
    bounds = summarize_bounds(data["elbo"], data["iw"], data["distortion"], data["rate"], data["kl"], data["dims"],
                              sigmas, fitted=settings.sigma is None)
    best = bounds.pop("sigma_index")
    metrics["elbo"] = {"available": True, "iw_samples": settings.iw_samples, **bounds}
    if settings.diffusability:
        metrics["diffusability"] = diffusability.summarise(data)

    elbo_bpd = bits_per_dim(-data["elbo"][:, best], data["dims"])
    iw_bpd = bits_per_dim(-data["iw"][:, best], data["dims"])
    per_image = []
    for i, name in enumerate(names):
        row = {"name": name, "psnr": float(data["psnr"][i]), "ssim": float(data["ssim"][i]),
               "elbo_bpd": float(elbo_bpd[i]), "iw_bpd": float(iw_bpd[i])}
        if "lpips" in data:
            row["lpips"] = float(data["lpips"][i])
        if settings.diffusability:
            row.update(diffusability.per_image(data, i))
        per_image.append(row)
    return metrics, per_image


def _protocol(codec: Codec, settings: EvalSettings, lpips_info: str | None, fid_info: str | None,
              sigma_rule: str) -> dict[str, Any]:
    """The report's ``protocol``: everything needed to reproduce or compare the figures."""
    import platform

    import torchmetrics

    import sdvae
    from sdvae.eval.diffusability import DEFINITIONS

    return {
        "resolution": settings.resolution, "center_crop": settings.center_crop and settings.resolution is not None,
        "preprocessing": settings.describe_crop() + "; then rounded to 8 bits",
        "channels": f"images read as {describe_channels(codec.channels)}; PSNR, SSIM and the bounds over all "
        "of them" + {1: "; LPIPS and rFID on the grayscale image repeated to RGB",
                     4: "; LPIPS and rFID on the RGB channels (alpha not seen)"}.get(codec.channels, ""),
        "reconstruction": "decoder(posterior mean), rounded to 8 bits (as a saved PNG) for PSNR/SSIM/LPIPS/rFID",
        "psnr": "10·log10(1/MSE) per image on [0,1], mean and population std over images",
        "ssim": "torchmetrics structural_similarity_index_measure (Gaussian 11, σ 1.5), per image",
        "lpips": lpips_info,
        "rfid": fid_info,
        "likelihood": ("p(x|z): per 8-bit subpixel a Gaussian of mean clamp(decoder(z), -1, 1) and scale sigma, "
                       "integrated over the value's bin of width 2/255 on the [-1,1] scale (edge bins to ±inf)"),
        "prior": "N(0, I) on the unscaled latents (scaling_factor/shift play no part)",
        "sigma_rule": sigma_rule,
        "iw_samples": settings.iw_samples,
        "elbo_estimator": "mean of the K log-weights (the IW bound uses the same K draws, so IW >= ELBO)",
        "bits_per_dim": f"-bound / ({codec.channels}·H·W·ln 2)",
        "seed": settings.seed, "dtype": codec.dtype_name, "device": str(codec.device), "tile": codec.tile,
        "batch_size": settings.batch_size,
        **({"diffusability": DEFINITIONS} if settings.diffusability else {}),
        "versions": {"sdvae": sdvae.__version__, "torch": torch.__version__,
                     "torchmetrics": torchmetrics.__version__, "torch_fidelity": _version("torch-fidelity"),
                     "diffusers": _version("diffusers"), "lpips": _version("lpips"),
                     "python": platform.python_version()},
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
