"""``LatentDataset``: an ``encode-dataset`` output as a torch ``Dataset`` of scaled latents."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from sdvae.errors import UserError
from sdvae.latents.format import read_dataset_meta, stored_to_tensor
from sdvae.latents.scaling import scale_latents


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
            from sdvae.seeding import seeded_generator

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
