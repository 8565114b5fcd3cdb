"""Training and validation batches for ``tools/train.py``: augmentation, resumable sharding, skipping.

A killed-and-resumed run sees exactly the batches of an uninterrupted one, whatever the number of
processes or DataLoader workers, because each piece is deterministic on its own:

* the images come from an :class:`~sdvae.images.sources.ImageSource` (:func:`~sdvae.images.sources.open_source`
  in :mod:`sdvae.images.sources`): a fixed-order sequence whose ``load(i, channels)`` decodes one image (to
  the model's image channels: 1 grayscale, 3 RGB, 4 RGBA) or raises :class:`UserError`.
* :class:`~sdvae.train.sampler.ResumableSampler` decides *which* images each process gets at each step: a pure function
  of (seed, step, rank), so resuming is "start at step k", not "replay the RNG".
* :class:`TrainDataset` decides *how* each image is cropped/flipped: a pure function of
  (seed, epoch, index) through a private ``torch.Generator``, never the global RNG, so worker count
  and scheduling order cannot change a pixel.

Unreadable images never stop a run: they are replaced (deterministically) by another image,
counted, and reported through :class:`SkipLog` in the main process. :func:`build_dataloaders`
puts the pieces together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from sdvae.errors import UserError
from sdvae.images.resize import center_crop, resize_shorter
from sdvae.images.sources import ImageSource
from sdvae.seeding import seeded_generator

# Rec. 601 luma weights: the grey level a colour cast's saturation change keeps fixed.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _prepare(image: torch.Tensor, resolution: int, resize: int) -> torch.Tensor:
    """Apply the ``resize`` rule, then upscale anything still smaller than the crop."""
    if resize > 0:
        image = resize_shorter(image, max(resize, resolution))
    elif min(image.shape[-2:]) < resolution:
        image = resize_shorter(image, resolution)
    return image


class TrainDataset(Dataset):
    """Augmented training crops whose randomness is a pure function of (seed, epoch, index).

    Keys are ``(epoch, k)`` pairs as yielded by :class:`ResumableSampler` (a plain ``k`` means epoch 0);
    ``k`` indexes ``indices`` (the training subset of ``source``).

    Each item draws its crop offsets and flip from a private ``torch.Generator`` seeded with a hash of
    (seed, epoch, source index), so the same key gives the same tensor in any process or worker, and
    a new epoch gives a new crop.

    An unreadable image is replaced by another training image chosen deterministically from the same
    key (up to ``max_retries`` times); the failures travel with the item (``"skipped"``) so the main
    process can count and log them. Keeping the batch full avoids empty or ragged batches under DDP.

    Mosaics (``mosaic=m > 1``): each item is an m×m grid of (R/m)² crops — the keyed image top-left,
    the other m²−1 drawn deterministically from the same key — so small training images make large
    items with a realistic share of image border (GroupNorm statistics then carry over to full-size
    photos). Mixed grids (``mosaic_grids``): each item draws its grid side from the list, so some items
    are one upscaled image with whole-image colour statistics. Colour casts (``color_cast=p``): with
    probability p an item gets one random whole-item colour transform (:meth:`cast`). Why each exists,
    measured on Kodak, is in the embedded checkpoint's model card (checkpoints/sdvae-tiny-f8c4/README.md).
    """

    def __init__(self, source: ImageSource, resolution: int, resize: int = 0,
                 crop: Literal["random", "center"] = "random", flip: bool = True, seed: int = 0,
                 indices: Sequence[int] | None = None, max_retries: int = 8, mosaic: int = 1,
                 mosaic_grids: Sequence[int] = (), color_cast: float = 0.0, channels: int = 3):
        """
        Args:
            source: where images come from.
            resolution: side R of the square crops.
            resize: resize the shorter side to this before cropping (0: keep the file's size).
                Images whose shorter side is still below R are resized up to R.
            crop: ``"random"`` (training) or ``"center"``.
            flip: random horizontal flips (p=0.5).
            seed: run seed.
            indices: source indices used for training (None: all).
            max_retries: replacement attempts for an unreadable image before the item is dropped.
            mosaic: m: each item is an m×m grid of (R/m)² crops of different images (1: plain crops).
            mosaic_grids: if non-empty, each item's grid side is drawn from this list instead
                (uniformly over entries; a repeated entry is drawn more often).
            color_cast: probability in [0, 1] that an item gets a random whole-item colour transform
                (see :meth:`cast`).
            channels: the model's image channels (1 grayscale, 3 RGB, 4 RGBA): what ``source.load`` decodes to.
        """
        if resolution <= 0:
            raise UserError(f"data.resolution must be positive, got {resolution}")
        _check_mosaic(resolution, mosaic)
        for g in mosaic_grids:
            _check_mosaic(resolution, g, "data.mosaic_grids entry")
        if not 0.0 <= color_cast <= 1.0:
            raise UserError(f"data.color_cast must be a probability in [0, 1], got {color_cast}")
        if crop not in ("random", "center"):
            raise UserError(f"data.crop must be 'random' or 'center', got {crop!r}")
        self.source, self.resolution, self.resize = source, resolution, resize
        self.crop, self.flip, self.seed, self.max_retries = crop, flip, seed, max_retries
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.mosaic, self.mosaic_grids = mosaic, tuple(mosaic_grids)
        self.color_cast, self.channels = color_cast, channels

    def __len__(self) -> int:
        return len(self.indices)

    def grid(self, epoch: int, k: int) -> int:
        """Grid side of item (epoch, k): ``mosaic``, or a deterministic draw from ``mosaic_grids``."""
        if not self.mosaic_grids:
            return self.mosaic
        pick = seeded_generator(self.seed, "grid", epoch, k)
        return self.mosaic_grids[int(torch.randint(len(self.mosaic_grids), (1,), generator=pick))]

    def cast(self, pixels: torch.Tensor, epoch: int, k: int) -> torch.Tensor:
        """Item (epoch, k)'s colour cast, drawn from its own generator (identity when not drawn).

        Args:
            pixels: (C,R,R) float32 in [-1,1], the assembled item.
            epoch, k: the item's key.

        Returns:
            (C,R,R) float32 in [-1,1]: ``clip(luma + s·(rgb − luma) + offset)`` with s log-uniform in
            [0.5, 2] and a per-channel offset uniform in [-0.4, 0.4], or ``pixels`` itself. RGBA: the same on
            the colour channels, alpha untouched; grayscale: the first offset only (a brightness shift).
        """
        if self.color_cast <= 0.0:
            return pixels
        gen = seeded_generator(self.seed, "color", epoch, k)
        # Same draws in the same order whatever the outcome, so the numbers never depend on branches.
        apply = bool(torch.rand((), generator=gen) < self.color_cast)
        saturation = float(torch.exp((torch.rand((), generator=gen) * 2 - 1) * math.log(2.0)))
        offset = (torch.rand(3, generator=gen) * 2 - 1) * 0.4
        if not apply:
            return pixels
        if pixels.shape[0] == 1:
            return (pixels + offset[0]).clamp(-1.0, 1.0)
        rgb = pixels[:3]
        luma = (rgb * _LUMA.view(3, 1, 1)).sum(0, keepdim=True)
        cast = (luma + saturation * (rgb - luma) + offset.view(3, 1, 1)).clamp(-1.0, 1.0)
        return torch.cat([cast, pixels[3:]]) if pixels.shape[0] > 3 else cast

    def augment(self, image: torch.Tensor, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Resize/crop/flip one image.

        Args:
            image: (C,H,W) float in [-1,1].
            generator: the item's private generator.
            size: crop side (default: the dataset's resolution R).

        Returns:
            (C,size,size) float32 in [-1,1], contiguous.
        """
        r = size or self.resolution
        image = _prepare(image, r, self.resize)
        h, w = image.shape[-2:]
        # Always draw the same three numbers in the same order, whatever the options: the stream
        # (and so every other item's result) never depends on which branches were taken.
        top = int(torch.randint(h - r + 1, (1,), generator=generator))
        left = int(torch.randint(w - r + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)
        image = image[:, top:top + r, left:left + r] if self.crop == "random" else center_crop(image, r)
        if self.flip and flip:
            image = image.flip(-1)
        return image.float().contiguous()

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """One training item.

        Returns:
            ``{"pixels": (C,R,R) float32 in [-1,1] or None if unreadable, "index": source index (of the
            top-left tile for a mosaic), "skipped": [(name, message), ...] failures met on the way}``.
        """
        epoch, k = key if isinstance(key, tuple) else (0, key)
        m = self.grid(epoch, k)
        tile = self.resolution // m
        skipped: list[tuple[str, str]] = []
        tiles, first = [], self.indices[k]
        for slot in range(m * m):
            pixels, index = self._tile(epoch, k, slot, tile, skipped)
            if pixels is None:
                return {"pixels": None, "index": self.indices[k], "skipped": skipped}
            tiles.append(pixels)
            if slot == 0:
                first = index
        if m == 1:
            pixels = tiles[0]
        else:
            rows = [torch.cat(tiles[r * m:(r + 1) * m], dim=2) for r in range(m)]
            pixels = torch.cat(rows, dim=1).contiguous()
        return {"pixels": self.cast(pixels, epoch, k), "index": first, "skipped": skipped}

    def _tile(self, epoch: int, k: int, slot: int, size: int,
              skipped: list[tuple[str, str]]) -> tuple[torch.Tensor | None, int]:
        """Slot 0: the keyed image; other slots (mosaic tiles): partners drawn from (seed, epoch, k, slot).

        Returns ((C,size,size) crop or None when every attempt failed, source index); failures are
        appended to ``skipped``.
        """
        pick = None if slot == 0 else seeded_generator(self.seed, "mosaic", epoch, k, slot)
        for attempt in range(self.max_retries + 1):
            if attempt == 0 and slot == 0:
                index = self.indices[k]
            else:  # a partner tile, or a deterministic replacement for an unreadable image
                if pick is None:
                    pick = seeded_generator(self.seed, "replace", epoch, k)
                index = self.indices[int(torch.randint(len(self.indices), (1,), generator=pick))]
            try:
                image = self.source.load(index, self.channels)
            except UserError as err:
                skipped.append((self.source.name(index), str(err)))
                continue
            # Slot 0 keeps the seed of a plain crop, so mosaic=1 runs are unchanged by this feature.
            generator = seeded_generator(self.seed, "augment", epoch, index, attempt, *([slot] if slot else []))
            return self.augment(image, generator, size), index
        return None, self.indices[k]


class ValDataset(Dataset):
    """Deterministic validation crops: same ``resize`` rule as training, then a center R×R crop.

    Items are ``{"pixels": (C,R,R) float32 in [-1,1] or None, "index": source index, "skipped": [...]}``;
    unreadable images are dropped by :func:`collate` (no replacement: validation must not change set).
    With ``mosaic=m``, item k is the m×m grid of the center (R/m)² crops of images ``k·m² … k·m²+m²−1``
    (so there are ``len(indices) // m²`` items).
    """

    def __init__(self, source: ImageSource, resolution: int, resize: int = 0, indices: Sequence[int] | None = None,
                 mosaic: int = 1, channels: int = 3):
        _check_mosaic(resolution, mosaic)
        self.source, self.resolution, self.resize, self.mosaic = source, resolution, resize, mosaic
        self.channels = channels  # the model's image channels (what source.load decodes to)
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices) // (self.mosaic * self.mosaic)

    def __getitem__(self, k: int) -> dict[str, Any]:
        m = self.mosaic
        size = self.resolution // m
        tiles = []
        for index in self.indices[k * m * m:(k + 1) * m * m]:
            try:
                image = self.source.load(index, self.channels)
            except UserError as err:
                return {"pixels": None, "index": index, "skipped": [(self.source.name(index), str(err))]}
            tiles.append(center_crop(_prepare(image, size, self.resize), size).float())
        rows = [torch.cat(tiles[r * m:(r + 1) * m], dim=2) for r in range(m)]
        return {"pixels": torch.cat(rows, dim=1).contiguous(), "index": self.indices[k * m * m], "skipped": []}


def _check_mosaic(resolution: int, mosaic: int, what: str = "data.mosaic") -> None:
    if not isinstance(mosaic, int) or mosaic < 1 or resolution % mosaic:
        raise UserError(f"{what}={mosaic} must be >= 1 and divide data.resolution={resolution}")
