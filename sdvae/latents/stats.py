"""Exact latent statistics of an ``encode-dataset`` output, and the scaling factors they recommend.

LDM set SD's ``scaling_factor`` from the standard deviation of the first batch; SD3 and FLUX define
``scaling_factor = 1/std`` and ``shift_factor = mean`` over their training latents. Here both come
from the *whole* dataset in one streaming pass (float64, Chan et al.'s parallel mean/variance merge),
so the result is exact up to float64 rounding and independent of the shard order or batch size.

What is measured (``over``):

* ``posterior`` (default when log-variances were stored): the distribution a diffusion model is
  trained on when it draws z = mean + σ·ε. Its moments are exact without sampling:
  E[z] = E[mean] and Var[z] = Var[mean] + E[σ²] (law of total variance over images and positions).
* ``mean``: the stored posterior means only (smaller std: the posterior noise is left out).
* ``sample``: the stored draws of ``--store sample`` (an estimate of ``posterior`` with noise).

For a FLUX.2 dataset the channels are those of the 2×2-patchified latents (4C, what FLUX.2's BatchNorm
normalises; patchifying only regroups values, so the moments stay exact), and ``--write-config`` writes
them into the BatchNorm running buffers of the weights (:func:`write_bn_statistics`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdvae.atomic import write_json
from sdvae.errors import UserError
from sdvae.latents.format import read_dataset_meta, stored_to_tensor
from sdvae.model.family import is_flux2

OVER = ("auto", "posterior", "mean")
ROWS_PER_STEP = 64  # rows converted to float64 at once: bounds memory for large latents


@dataclass
class LatentStats:
    """Per-channel and global moments of a latent dataset (population std, ddof=0).

    Attributes:
        over: ``posterior``, ``mean`` or ``sample`` (see the module docstring).
        rows: latents measured.
        values_per_channel: values per channel (rows × positions).
        channel_mean, channel_std: per channel (C,).
        mean, std: over all channels and positions together.
        buckets: rows per aspect-ratio bucket ``{"HxW": count}`` of an ``--buckets`` output, else None
            (the statistics pool every bucket; ``--hflip`` copies are not counted).
    """

    over: str
    rows: int
    values_per_channel: int
    channel_mean: list[float]
    channel_std: list[float]
    mean: float
    std: float
    buckets: dict[str, int] | None = None
    patchified: bool = False  # FLUX.2: channels of the 2×2-patchified latents (4C)

    @property
    def scaling_factor(self) -> float:
        """Recommended ``scaling_factor`` = 1/std (SD3/FLUX definition)."""
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        """Recommended ``shift_factor`` = mean."""
        return self.mean

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


class _Moments:
    """Streaming per-channel count/mean/M2 (+ sum of posterior variances), merged exactly in float64."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.noise = np.zeros(channels)  # Σ σ² per channel (posterior only)

    def add(self, x: np.ndarray, var: np.ndarray | None = None) -> None:
        """Merge a block of values x (C, M) float64 (and their posterior variances (C, M))."""
        m = x.shape[1]
        if m == 0:
            return
        block_mean = x.mean(1)
        block_m2 = ((x - block_mean[:, None]) ** 2).sum(1)
        delta, total = block_mean - self.mean, self.n + m
        self.mean += delta * (m / total)
        self.m2 += block_m2 + delta**2 * (self.n * m / total)
        self.n = total
        if var is not None:
            self.noise += var.sum(1)

    def result(self, over: str, rows: int) -> LatentStats:
        if self.n == 0:
            raise UserError("the dataset has no rows to measure")
        var = (self.m2 + self.noise) / self.n
        grand = float(self.mean.mean())  # every channel has the same count
        total_var = float((self.m2.sum() + self.noise.sum() + self.n * ((self.mean - grand) ** 2).sum())
                          / (self.n * len(self.mean)))
        return LatentStats(over, rows, self.n, [float(v) for v in self.mean], [float(math.sqrt(v)) for v in var],
                           grand, math.sqrt(total_var))


def _channels_first(t: torch.Tensor, patch: bool) -> np.ndarray:
    """(n, C, h, w) → (C', n·h'·w') float64, C' = 4C after FLUX.2's 2×2 patchify when ``patch``."""
    from sdvae.latents.scaling import patchify

    t = patchify(t.double()) if patch else t.double()
    return t.transpose(0, 1).reshape(t.shape[1], -1).numpy()


def _blocks(path: Path, columns: list[str], dtype: str, patch: bool = False) -> Iterator[list[np.ndarray]]:
    """Yield, per group of rows of equal shape, each column's values as (C, M) float64 (patchified: (4C, M))."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    for entry in state["_data_files"]:
        with pa.memory_map(str(path / entry["filename"])) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, ROWS_PER_STEP):
                    part = batch.slice(start, ROWS_PER_STEP)
                    shapes = part.column("shape").to_pylist()
                    flats = [part.column(c).flatten().to_numpy(zero_copy_only=False) for c in columns]
                    if all(s == shapes[0] for s in shapes):
                        runs = [(shapes[0], len(shapes), flats)]
                    else:  # --crop none: rows differ in size; take them one by one
                        ends = np.cumsum([0] + [math.prod(s) for s in shapes])
                        runs = [(s, 1, [f[ends[i]:ends[i + 1]] for f in flats]) for i, s in enumerate(shapes)]
                    for shape, n, values in runs:
                        yield [_channels_first(stored_to_tensor(v, dtype, (n, *shape)), patch) for v in values]


def compute_latent_stats(path: str | os.PathLike[str], over: str = "auto") -> LatentStats:
    """Per-channel and global mean/std of a latent dataset, in one exact streaming pass.

    Args:
        path: an ``sdvae encode-dataset`` output folder.
        over: ``auto`` (posterior when log-variances are stored, else the stored latents), ``posterior``
            or ``mean``.

    Raises:
        UserError: not a complete latent dataset, or ``over`` impossible for what was stored.
    """
    folder = Path(path)
    meta = read_dataset_meta(folder)
    store = meta["store"]
    if over not in OVER:
        raise UserError(f"--over must be one of {', '.join(OVER)}, got {over!r}")
    if over == "auto":
        over = "posterior" if store == "mean_logvar" else ("mean" if store == "mean" else "sample")
    if over == "posterior" and store != "mean_logvar":
        raise UserError(f"{folder}: --over posterior needs stored log-variances (this dataset has --store {store})")
    if over == "mean" and store == "sample":
        raise UserError(f"{folder}: holds posterior samples (--store sample), not means; use --over auto")
    columns = ["mean", "logvar"] if over == "posterior" else [meta["latent_columns"][0]]
    patch = meta["scaling"].get("family") == "flux2"
    moments: _Moments | None = None
    for values in _blocks(folder, columns, meta["dtype"], patch):
        if moments is None:
            moments = _Moments(values[0].shape[0])
        moments.add(values[0], np.exp(values[1]) if over == "posterior" else None)
    if moments is None:
        raise UserError(f"{folder}: the dataset has no rows to measure")
    stats = moments.result(over, int(meta["rows"]))
    stats.buckets, stats.patchified = meta.get("bucket_histogram"), patch
    return stats


def posterior_stats(posteriors: Iterable[tuple[torch.Tensor, torch.Tensor]], patch: bool = False) -> LatentStats:
    """The ``posterior`` statistics of ``sdvae latent-stats`` for posteriors held in memory.

    Same definition and the same exact float64 merge as :func:`compute_latent_stats` (which reads an
    ``encode-dataset`` output): E[z] = E[mean], Var[z] = Var[mean] + E[σ²].

    Args:
        posteriors: ``(mean, logvar)`` pairs of (B, C, h, w) tensors (any float dtype/device).
        patch: measure the 2×2-patchified channels (FLUX.2's BatchNorm statistics).

    Raises:
        UserError: no posterior given.
    """
    moments: _Moments | None = None
    rows = 0
    for mean, logvar in posteriors:
        flat = [_channels_first(t.detach().cpu(), patch) for t in (mean, logvar)]
        if moments is None:
            moments = _Moments(flat[0].shape[0])
        moments.add(flat[0], np.exp(flat[1]))
        rows += mean.shape[0]
    if moments is None:
        raise UserError("no latents to measure")
    stats = moments.result("posterior", rows)
    stats.patchified = patch
    return stats


def write_scaling_config(folder: str | os.PathLike[str], stats: LatentStats,
                         per_channel: bool = False, shift: bool = True) -> tuple[Path, dict[str, Any]]:
    """Write the recommended scaling into a diffusers folder's config.json (atomically).

    Without ``per_channel``: ``scaling_factor`` = 1/std and ``shift_factor`` = mean, and
    ``latents_mean``/``latents_std`` are cleared (they would take precedence, see
    :func:`sdvae.latents.scaling.scale_latents`). With it: ``latents_mean``/``latents_std`` per channel and
    ``scaling_factor`` 1.0, ``shift_factor`` cleared, so that scaled latents again have unit variance
    (the per-channel rule is ``(z - latents_mean) * scaling_factor / latents_std``). ``shift=False``
    (a model without a ``shift_factor``, e.g. SD 1.x/2.x) writes only ``scaling_factor`` = 1/std.

    Returns:
        (the config.json written, the keys written with their values).

    Raises:
        UserError: no config.json, not an AutoencoderKL config, or a different latent channel count.
    """
    base = Path(folder)
    candidates = [base] if base.name == "config.json" else [base / "config.json", base / "vae" / "config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"{folder}: no config.json (nor vae/config.json); pass a diffusers model folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if stats.patchified or is_flux2(config):
        raise UserError(f"{path}: FLUX.2 statistics and models take their normalisation from the BatchNorm "
                        "buffers (write_bn_statistics), not config.json" if stats.patchified else
                        f"{path}: is a FLUX.2 VAE but the statistics are of an unpatchified dataset")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{path}: is a {config.get('_class_name')} config, not an AutoencoderKL one")
    channels = config.get("latent_channels")
    if channels is not None and channels != len(stats.channel_mean):
        raise UserError(f"{path}: model has {channels} latent channels, the statistics {len(stats.channel_mean)}")
    if per_channel:
        updates = {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": stats.channel_mean,
                   "latents_std": stats.channel_std}
    elif shift:
        updates = {"scaling_factor": stats.scaling_factor, "shift_factor": stats.shift_factor,
                   "latents_mean": None, "latents_std": None}
    else:
        updates = {"scaling_factor": stats.scaling_factor, "latents_mean": None, "latents_std": None}
    config.update(updates)
    write_json(path, config)
    return path, updates


def write_bn_statistics(folder: str | os.PathLike[str], stats: LatentStats) -> tuple[Path, dict[str, Any]]:
    """Write FLUX.2's patchified per-channel mean and variance into a FLUX.2 folder's BatchNorm buffers.

    ``bn.running_mean`` = the channel means and ``bn.running_var`` = the channel variances (population),
    in the weights file's own dtype; every other tensor and ``config.json`` stay as they are. The weights
    file is rewritten atomically (a new copy replaces it). ``Flux2Pipeline`` and
    :func:`sdvae.latents.scaling.scale_latents` then give those latents mean 0 and std
    sqrt(var / (var + batch_norm_eps)) ≈ 1 per channel.

    Returns:
        (the weights file written, ``{"bn.running_mean": [...], "bn.running_var": [...]}``).

    Raises:
        UserError: not a FLUX.2 folder, statistics not patchified, or another channel count.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdvae.atomic import atomic_file

    base = Path(folder)
    base = base.parent if base.name == "config.json" else base
    base = base / "vae" if not (base / "config.json").is_file() and (base / "vae" / "config.json").is_file() else base
    config_path, weights = base / "config.json", base / "diffusion_pytorch_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise UserError(f"{folder}: no config.json + diffusion_pytorch_model.safetensors; pass a diffusers folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from None
    if not is_flux2(config):
        raise UserError(f"{config_path}: not a FLUX.2 (AutoencoderKLFlux2) model, but the statistics are of "
                        "FLUX.2's patchified latents")
    if not stats.patchified:
        raise UserError(f"{folder}: is a FLUX.2 VAE but the statistics are of an unpatchified dataset")
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    except Exception as err:  # damaged or not safetensors
        raise UserError(f"{weights}: not a readable .safetensors file ({str(err).splitlines()[0][:120]})") from None
    old = tensors.get("bn.running_mean")
    if old is None or "bn.running_var" not in tensors:
        raise UserError(f"{weights}: has no bn.running_mean/bn.running_var to write into")
    if old.numel() != len(stats.channel_mean):
        raise UserError(f"{weights}: the BatchNorm has {old.numel()} channels, the statistics "
                        f"{len(stats.channel_mean)}")
    var = [sd * sd for sd in stats.channel_std]
    tensors["bn.running_mean"] = torch.tensor(stats.channel_mean, dtype=torch.float64).to(old.dtype)
    tensors["bn.running_var"] = torch.tensor(var, dtype=torch.float64).to(tensors["bn.running_var"].dtype)
    with atomic_file(weights) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
    return weights, {"bn.running_mean": stats.channel_mean, "bn.running_var": var}
