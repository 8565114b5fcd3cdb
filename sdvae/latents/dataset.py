"""``LatentDataset``: an ``encode-dataset`` output as a torch ``Dataset`` of scaled latents, in either layout
(Arrow IPC shards or WebDataset tar shards), from a local folder or a URL.

:class:`LatentItems` is the one row → item rule (scaling, posterior draws, flips), shared with
:class:`sdvae.latents.stream.LatentStream`; reading the stored rows: :mod:`sdvae.latents.stored_rows`.
"""

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
from sdvae.latents.format import stored_to_tensor
from sdvae.latents.scaling import latent_normalization, scale_latents
from sdvae.latents.stored_rows import LatentShards, open_rows
from sdvae.model.family import is_flux2
from sdvae.seeding import seeded_generator
from sdvae.storage.urls import is_url


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


# --------------------------------------------------------------------------------------------------
# Row → item


class LatentItems:
    """The rule that makes a diffusion-training item of a stored row (see :class:`LatentDataset` for the
    item and the arguments). ``epoch`` (:meth:`set_epoch`) selects the posterior draws and flips in force."""

    def __init__(self, meta: Mapping[str, Any], where: str, *, seed: int = 0, scaled: bool = True,
                 sample: bool = True, scaling: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 columns: Sequence[str] | None = None, flip: str = "random"):
        self.meta = dict(meta)
        self.seed, self.scaled, self.epoch = seed, scaled, 0
        self.scaling = _scaling_config(scaling, self.meta)
        self._patched = scaled and is_flux2(self.scaling)  # FLUX.2 items are (4C, h/2, w/2)
        self.sample = sample and "logvar" in self.meta["latent_columns"]
        carried = list(self.meta.get("carried_columns", []))
        if columns is not None:
            unknown = [c for c in columns if c not in carried]
            if unknown:
                raise UserError(f"{where}: no carried column(s) {', '.join(unknown)} "
                                f"(carried: {', '.join(carried) or 'none'})")
            carried = list(columns)
        self.carried = carried
        if flip not in ("random", "always", "never"):
            raise ValueError(f"flip must be random, always or never, got {flip!r}")
        self.has_flips = self.meta.get("hflip", "none") == "both"
        if flip == "always" and not self.has_flips:
            raise UserError(f"{where}: holds no mirrored copies (encode-dataset --hflip both); flip='always' "
                            "is impossible")
        self.flip = flip if self.has_flips else "never"
        wanted = ["mean", "logvar"] if self.sample else [self.meta["latent_columns"][0]]
        if self.flip != "never":
            wanted += flip_columns(wanted)
        self.latent_columns = wanted  # the stored columns an item needs

    def set_epoch(self, epoch: int) -> None:
        """Use the posterior draws and flips of ``epoch`` from now on (call before each epoch)."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        """Whether row ``index`` (its input index) is served mirrored in the current epoch."""
        if self.flip != "random":
            return self.flip == "always"
        return bool(torch.rand((), generator=seeded_generator(self.seed, "flip", self.epoch, index)) < 0.5)

    def _latent(self, stored: Mapping[str, Any], row: dict[str, Any]) -> torch.Tensor:
        """The row's latent in the decoder's space, (C,h,w) float32; sets ``row["flipped"]`` (``--hflip both``)."""
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
        """The item of an unscaled latent (C,h,w) and its row (scaled here when ``scaled``)."""
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

    def make_item(self, stored: Mapping[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        """A stored row (see :data:`sdvae.latents.stored_rows.StoredRow`) → its item for the current epoch."""
        return self._item(self._latent(stored, row), row)

    def served_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (C,h,w) an item of a stored (C,h,w) latent has (scaled FLUX.2: (4C, h/2, w/2))."""
        if self._patched:
            c, h, w = shape
            return (int(c) * 4, int(h) // 2, int(w) // 2)
        return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------------------------------
# The dataset


class LatentDataset(LatentItems, TorchDataset):
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

    Either layout (``--format arrow|webdataset``), local or a URL (``s3://...``; random access costs: the module
    docstring). Datasets too large to index, or streamed by many ranks: :class:`~sdvae.latents.stream.LatentStream`.

    Args:
        path: the output folder or URL of ``sdvae encode-dataset``.
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
        ref = os.fspath(path)
        self.path: str | Path = ref if is_url(ref) else Path(ref)
        shards = LatentShards(ref)
        super().__init__(shards.meta, shards.where, seed=seed, scaled=scaled, sample=sample, scaling=scaling,
                         columns=columns, flip=flip)
        self.layout = shards.layout
        self._rows = open_rows(shards, self.latent_columns, self.carried)

    def __len__(self) -> int:
        return len(self._rows)

    def shapes(self) -> list[tuple[int, ...]]:
        """Every row's latent shape as served (C, h, w; scaled FLUX.2: (4C, h/2, w/2)), in row order: what
        :class:`BucketBatchSampler` groups by."""
        return [self.served_shape(s) for s in self._rows.shapes()]

    def unscaled(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Row ``i``'s latent in the decoder's space, (C,h,w) float32, and its other columns."""
        stored, row = self._rows.get([i])[0]
        return self._latent(stored, row), row

    def __getitem__(self, i: int) -> dict[str, Any]:
        z, row = self.unscaled(i)
        return self._item(z, row)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several rows, in one columnar read where the layout allows (what a DataLoader's batch sampler calls)."""
        return [self.make_item(stored, row) for stored, row in self._rows.get([int(i) for i in indices])]
