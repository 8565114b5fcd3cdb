"""Latent scaling: the only place where latents move between the VAE's space and the diffusion space.

A diffusion model sees ``scaled`` latents; the VAE decoder takes ``unscaled`` ones. Which affine map
applies depends on the model's config and mirrors what diffusers pipelines do:

* ``latents_mean`` / ``latents_std`` set (per channel, SDXL-style pipelines):
  ``scaled = (z - mean) * scaling_factor / std``
* otherwise ``shift_factor`` (SD3, FLUX; ``None`` means 0):
  ``scaled = (z - shift_factor) * scaling_factor``

Also here: the two latent file formats and their readers — the single ``.safetensors`` file of
``sdvae encode`` and the dataset folders of ``sdvae encode-dataset`` (:class:`LatentDataset`) — and
:func:`latent_preview`, a decoder-free look at latents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from sdvae.atomic import atomic_file
from sdvae.errors import UserError


def _affine(config: Mapping[str, Any], z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Return (shift, scale) such that ``scaled = (z - shift) * scale``, broadcastable to z (B,C,h,w)."""
    scaling = float(config.get("scaling_factor", 1.0) or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        std_t = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return mean_t, scaling / std_t
    shift = config.get("shift_factor")
    return float(shift or 0.0), scaling


def scale_latents(z: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Map VAE latents to diffusion-model latents.

    Args:
        z: (B,C,h,w) unscaled latents, as the encoder produces them.
        config: the VAE's config (``vae.config`` or a dict with the same keys).

    Returns:
        (B,C,h,w) scaled latents (roughly unit variance for a well-chosen scaling factor).
    """
    shift, scale = _affine(config, z)
    return (z - shift) * scale


def unscale_latents(z: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of :func:`scale_latents`: diffusion-space latents (B,C,h,w) back to the decoder's input."""
    shift, scale = _affine(config, z)
    return z / scale + shift


def write_latents_file(tensors: dict[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write latents and their metadata to one ``.safetensors`` file, atomically.

    Args:
        tensors: name -> tensor (e.g. ``"00000.mean"`` (C,h,w)).
        meta: JSON-able metadata (model reference, config hash, whether scaled, image sizes...).
            Stored as JSON under the ``"sdvae"`` key of the safetensors header, with ``format``,
            ``config_hash`` and ``scaled`` also as plain string keys for other readers.
        path: destination; written to a temporary file in the same folder, then renamed.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: latents are written as .safetensors; use that extension")
    header = {"sdvae": json.dumps(meta)}
    header.update({k: str(meta[k]).lower() if isinstance(meta[k], bool) else str(meta[k])
                   for k in ("format", "config_hash", "scaled") if k in meta})
    with atomic_file(dest) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
    return dest


def read_latents_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_latents_file`.

    Returns:
        (tensors, metadata).

    Raises:
        UserError: missing, unreadable or not a latents file; the message names the file.
    """
    from safetensors import safe_open

    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    try:
        with safe_open(str(src), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{src}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if "sdvae" not in header:
        raise UserError(f"{src}: safetensors file has no sdvae metadata (not written by `sdvae encode`)")
    return tensors, json.loads(header["sdvae"])


# --------------------------------------------------------------------------------------------------
# Latent datasets written by `sdvae encode-dataset` (see sdvae.encode_dataset for the writer)
# --------------------------------------------------------------------------------------------------

DATASET_FORMAT = "sdvae-latent-dataset/1"
DATASET_META = "sdvae_latents.json"  # written last: its presence means the dataset is complete
ENCODE_ARGS = "sdvae_encode_args.json"  # written first: the arguments a resumed run must repeat
# Arrow has no bfloat16: bf16 latents are stored as their raw 16-bit patterns (uint16), which is
# lossless and as small as the tensor; fp16 uses Arrow's halffloat. Readers go through
# :func:`stored_to_tensor`.
ARROW_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


def read_dataset_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset-level metadata of an ``encode-dataset`` output folder.

    Returns:
        The JSON object of ``PATH/sdvae_latents.json``: ``model``, ``config_hash``, ``arch_hash``,
        ``config``, ``preprocessing``, ``store``, ``dtype``, ``latent_columns``, ``scaled`` (False),
        ``scaling`` (the scaling/shift in force at encode time), ``rows``, ``skipped``, ...

    Raises:
        UserError: not such a folder, or a run that has not finished (the message says what to do).
    """
    folder = Path(path)
    meta_path = folder / DATASET_META
    if not meta_path.is_file():
        if (folder / ENCODE_ARGS).is_file():
            raise UserError(f"{folder}: encode-dataset has not finished here; run the same command again to "
                            "complete it")
        raise UserError(f"{folder}: not an `sdvae encode-dataset` output (no {DATASET_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_path}: unreadable ({err})") from None
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {DATASET_FORMAT})")
    return meta


def stored_to_tensor(values: Any, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """One stored latent (a flat array from the dataset) → (C,h,w) float32 tensor.

    Args:
        values: flat numpy array (or list) as read from the ``mean``/``logvar``/``latent`` column.
        dtype: the dataset's ``dtype`` (``fp32``/``fp16``/``bf16``; bf16 arrives as uint16 bit patterns).
        shape: (C,h,w) from the row's ``shape`` column.
    """
    import numpy as np

    # np.array copies: rows read from a memory-mapped dataset are read-only buffers.
    if dtype == "bf16":
        tensor = torch.from_numpy(np.array(values, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(values, dtype=ARROW_DTYPES[dtype]))
    return tensor.float().reshape(tuple(int(s) for s in shape))


def _scaling_config(scaling: Mapping[str, Any] | str | os.PathLike[str] | None,
                    meta: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve LatentDataset's ``scaling`` argument to a config mapping for :func:`scale_latents`."""
    if scaling is None:
        return dict(meta["scaling"])
    if isinstance(scaling, Mapping):
        return dict(scaling)
    folder = Path(scaling)
    cfg = folder / "config.json" if folder.is_dir() else folder
    if folder.is_dir() and not cfg.is_file() and (folder / "vae" / "config.json").is_file():
        cfg = folder / "vae" / "config.json"
    if not cfg.is_file():
        raise UserError(f"{scaling}: no config.json to take the latent scaling from")
    return json.loads(cfg.read_text())


class LatentDataset(TorchDataset):
    """The rows of an ``sdvae encode-dataset`` output as diffusion-training examples.

    Each item is ``{"latent": (C,h,w) float32, "index": int, "key": str, "original_size": (2,) int64
    (H, W), "crop_box": (4,) int64 (top, left, height, width in the resized image), **carried columns}``.

    The latent is, by default, *scaled* (diffusion space) with :func:`scale_latents` and the scaling
    recorded at encode time (or ``scaling``). When the posterior's log-variance was stored
    (``--store mean_logvar``) and ``sample`` is true, it is a fresh draw z = mean + exp(logvar/2)·ε with
    ε from a private generator seeded by (seed, epoch, index): the same in any worker or process,
    different for each epoch (:meth:`set_epoch`). Otherwise it is the stored latent.

    Rows of one dataset share a shape when encode-dataset cropped (``--crop center|random``), so the
    default DataLoader collate works; ``--crop none`` outputs need bucketing by ``shape``.

    Args:
        path: the output folder of ``sdvae encode-dataset``.
        seed: seed of the posterior draws.
        scaled: apply the scaling (False: the VAE decoder's space, e.g. to decode a row).
        sample: draw from the posterior when logvar is stored (False: use the mean).
        scaling: the scaling config to apply: a mapping with ``scaling_factor``/``shift_factor``/
            ``latents_mean``/``latents_std`` (e.g. ``vae.config`` or what ``sdvae latent-stats`` wrote),
            a diffusers folder or config.json path, or None for the scaling in force at encode time.
        columns: carried columns to return (None: all of them).
    """

    def __init__(self, path: str | os.PathLike[str], *, seed: int = 0, scaled: bool = True, sample: bool = True,
                 scaling: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 columns: Sequence[str] | None = None):
        import datasets

        self.path = Path(path)
        self.meta = read_dataset_meta(self.path)
        self.seed, self.scaled, self.epoch = seed, scaled, 0
        self.scaling = _scaling_config(scaling, self.meta)
        self.sample = sample and "logvar" in self.meta["latent_columns"]
        ds = datasets.load_from_disk(str(self.path))
        carried = list(self.meta.get("carried_columns", []))
        if columns is not None:
            unknown = [c for c in columns if c not in carried]
            if unknown:
                raise UserError(f"{self.path}: no carried column(s) {', '.join(unknown)} "
                                f"(carried: {', '.join(carried) or 'none'})")
            carried = list(columns)
        self.carried = carried
        wanted = ["mean", "logvar"] if self.sample else [self.meta["latent_columns"][0]]
        self._latents = ds.with_format("numpy", columns=wanted)
        self._rest = ds.select_columns(["index", "key", "shape", "original_size", "crop_box", *carried])

    def __len__(self) -> int:
        return len(self._rest)

    def set_epoch(self, epoch: int) -> None:
        """Use the posterior draws of ``epoch`` from now on (call before each epoch)."""
        self.epoch = int(epoch)

    def unscaled(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Row ``i``'s latent in the decoder's space, (C,h,w) float32, and its other columns."""
        row = self._rest[i]
        dtype, shape = self.meta["dtype"], row["shape"]
        stored = self._latents[i]
        if self.sample:
            from sdvae.sampler import seeded_generator

            mean = stored_to_tensor(stored["mean"], dtype, shape)
            logvar = stored_to_tensor(stored["logvar"], dtype, shape)
            eps = torch.randn(mean.shape, generator=seeded_generator(self.seed, "latent", self.epoch, row["index"]))
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = stored_to_tensor(next(iter(stored.values())), dtype, shape)
        return z, row

    def __getitem__(self, i: int) -> dict[str, Any]:
        z, row = self.unscaled(i)
        if self.scaled:
            z = scale_latents(z[None], self.scaling)[0]
        item = {"latent": z, "index": int(row["index"]), "key": row["key"],
                "original_size": torch.tensor(row["original_size"], dtype=torch.int64),
                "crop_box": torch.tensor(row["crop_box"], dtype=torch.int64)}
        item.update({c: row[c] for c in self.carried})
        return item


# Linear map from scaled (diffusion-space) SD-style 4-channel latents to RGB in about [-1, 1]: the
# coefficients widely used for SD 1.x/2.x live previews (e.g. ComfyUI's ``latent_rgb_factors``).
# Rows: latent channels; columns: R, G, B.
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_rgb_matrix(channels: int) -> torch.Tensor:
    """The fixed (C,3) matrix :func:`latent_preview` uses.

    4 channels: :data:`SD_LATENT_RGB`. Any other count (no published map fits every model): channel c
    feeds colour c mod 3 with weight 0.5/sqrt(n), n being the number of channels feeding that colour,
    so unit-variance channels give colours with standard deviation 0.5 (±2σ fits [-1, 1]).
    """
    if channels == 4:
        return torch.tensor(SD_LATENT_RGB, dtype=torch.float32)
    matrix = torch.zeros(channels, 3)
    for c in range(channels):
        matrix[c, c % 3] = 1.0
    return matrix * 0.5 / matrix.sum(0).clamp(min=1).sqrt()


def latent_preview(z: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """A quick look at latents without the decoder: a fixed linear map of channels to RGB.

    Args:
        z: (C,h,w) or (B,C,h,w) *scaled* latents (see :func:`scale_latents`).
        upscale: nearest-neighbour enlargement (e.g. the VAE's downsampling factor).

    Returns:
        (B,3,h·upscale,w·upscale) float32 in [0, 1] (B=1 for a single latent).
    """
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4:
        raise ValueError(f"latent_preview expects (C,h,w) or (B,C,h,w), got {tuple(z.shape)}")
    rgb = torch.einsum("bchw,ck->bkhw", z.float(), latent_rgb_matrix(z.shape[1]).to(z.device))
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, -2).repeat_interleave(upscale, -1)
    return rgb
