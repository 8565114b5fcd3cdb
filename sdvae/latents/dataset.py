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
from sdvae.latents.flips import flip_columns, flipped_crop_box
from sdvae.latents.format import read_dataset_meta, stored_to_tensor
from sdvae.latents.scaling import latent_normalization, scale_latents
from sdvae.model.family import is_flux2
from sdvae.seeding import seeded_generator


def _scaling_config(scaling: Mapping[str, Any] | str | os.PathLike[str] | None,
                    meta: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve LatentDataset's ``scaling`` argument to a normalisation mapping for :func:`scale_latents`."""
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
    config = json.loads(cfg.read_text())
    return latent_normalization(cfg.parent) if is_flux2(config) else config  # FLUX.2: BN stats from the weights


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
    default DataLoader collate works; ``--buckets`` and ``--crop none`` outputs need batches of one
    shape: ``DataLoader(data, batch_sampler=BucketBatchSampler(data.shapes(), ...))``
    (:mod:`sdvae.latents.bucket_sampler`).

    Outputs of ``--hflip both`` also hold the latents of the mirrored images
    (:mod:`sdvae.latents.flips`). With ``flip="random"`` (the default) an item is the mirrored copy
    with probability ½, drawn from (seed, epoch, index) like the posterior noise; ``"always"`` and
    ``"never"`` choose one side. Such items carry ``"flipped"`` (bool), and their ``crop_box`` is the
    box in the mirrored image.

    Args:
        path: the output folder of ``sdvae encode-dataset``.
        seed: seed of the posterior draws.
        scaled: apply the scaling (False: the VAE decoder's space, e.g. to decode a row).
        sample: draw from the posterior when logvar is stored (False: use the mean).
        scaling: the scaling config to apply: a mapping with ``scaling_factor``/``shift_factor``/
            ``latents_mean``/``latents_std`` (e.g. ``vae.config`` or what ``sdvae latent-stats`` wrote) or
            :func:`~sdvae.latents.scaling.latent_normalization` of a model, a diffusers folder or config.json
            path (FLUX.2: its BatchNorm statistics are read from the weights), or None for the
            normalisation in force at encode time (recorded with FLUX.2's statistics). FLUX.2 latents come
            out patchified: (4C, h/2, w/2).
        columns: carried columns to return (None: all of them).
        flip: ``random``, ``always`` or ``never`` use the mirrored copies of ``--hflip both``.
    """

    def __init__(self, path: str | os.PathLike[str], *, seed: int = 0, scaled: bool = True, sample: bool = True,
                 scaling: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 columns: Sequence[str] | None = None, flip: str = "random"):
        import datasets

        self.path = Path(path)
        self.meta = read_dataset_meta(self.path)
        self.seed, self.scaled, self.epoch = seed, scaled, 0
        self.scaling = _scaling_config(scaling, self.meta)
        self._patched = scaled and is_flux2(self.scaling)  # FLUX.2 items are (4C, h/2, w/2)
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
        if flip not in ("random", "always", "never"):
            raise ValueError(f"flip must be random, always or never, got {flip!r}")
        self.has_flips = self.meta.get("hflip", "none") == "both"
        if flip == "always" and not self.has_flips:
            raise UserError(f"{self.path}: holds no mirrored copies (encode-dataset --hflip both); flip='always' "
                            "is impossible")
        self.flip = flip if self.has_flips else "never"
        wanted = ["mean", "logvar"] if self.sample else [self.meta["latent_columns"][0]]
        if self.flip != "never":
            wanted += flip_columns(wanted)
        self._latents = ds.with_format("numpy", columns=wanted)
        self._rest = ds.select_columns(["index", "key", "shape", "original_size", "resized_size", "crop_box",
                                        *carried])

    def __len__(self) -> int:
        return len(self._rest)

    def shapes(self) -> list[tuple[int, ...]]:
        """Every row's latent shape as served (C, h, w; scaled FLUX.2: (4C, h/2, w/2)), in row order: what
        :class:`BucketBatchSampler` groups by."""
        if self._patched:
            return [(c * 4, h // 2, w // 2) for c, h, w in self._rest["shape"]]
        return [tuple(s) for s in self._rest["shape"]]

    def set_epoch(self, epoch: int) -> None:
        """Use the posterior draws of ``epoch`` from now on (call before each epoch)."""
        self.epoch = int(epoch)

    def unscaled(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Row ``i``'s latent in the decoder's space, (C,h,w) float32, and its other columns."""
        row = self._rest[i]
        return self._latent(self._latents[i], row), row

    def flipped(self, index: int) -> bool:
        """Whether row ``index`` (its input index) is served mirrored in the current epoch."""
        if self.flip != "random":
            return self.flip == "always"
        return bool(torch.rand((), generator=seeded_generator(self.seed, "flip", self.epoch, index)) < 0.5)

    def _latent(self, stored: Mapping[str, Any], row: dict[str, Any]) -> torch.Tensor:
        dtype, shape = self.meta["dtype"], row["shape"]
        suffix = "_flip" if self.has_flips and self.flipped(row["index"]) else ""
        if self.has_flips:
            row["flipped"] = bool(suffix)
        if self.sample:
            mean = stored_to_tensor(stored["mean" + suffix], dtype, shape)
            logvar = stored_to_tensor(stored["logvar" + suffix], dtype, shape)
            eps = torch.randn(mean.shape, generator=seeded_generator(self.seed, "latent", self.epoch, row["index"]))
            return mean + torch.exp(0.5 * logvar) * eps
        return stored_to_tensor(stored[self.meta["latent_columns"][0] + suffix], dtype, shape)

    def _item(self, z: torch.Tensor, row: Mapping[str, Any]) -> dict[str, Any]:
        if self.scaled:
            z = scale_latents(z[None], self.scaling)[0]
        box = flipped_crop_box(row["crop_box"], row["resized_size"]) if row.get("flipped") else row["crop_box"]
        item = {"latent": z, "index": int(row["index"]), "key": row["key"],
                "original_size": torch.tensor(row["original_size"], dtype=torch.int64),
                "crop_box": torch.tensor(box, dtype=torch.int64)}
        if self.has_flips:
            item["flipped"] = row["flipped"]
        item.update({c: row[c] for c in self.carried})
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        z, row = self.unscaled(i)
        return self._item(z, row)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several rows with one columnar read (what a DataLoader with a batch sampler calls)."""
        indices = [int(i) for i in indices]
        rows, stored = self._rest[indices], self._latents[indices]
        out = []
        for j in range(len(indices)):
            row = {k: v[j] for k, v in rows.items()}
            out.append(self._item(self._latent({k: v[j] for k, v in stored.items()}, row), row))
        return out
