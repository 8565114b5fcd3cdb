"""Training and validation loaders: validation split, collation, skipped-file logging."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdvae.device import cuda_available
from sdvae.errors import UserError
from sdvae.images.sources import open_source
from sdvae.seeding import seeded_generator
from sdvae.train.config import DataConfig
from sdvae.train.datasets import TrainDataset, ValDataset
from sdvae.train.sampler import ResumableSampler

log = logging.getLogger(__name__)

# Seed of the held-out validation split: fixed (not train.seed) so runs with different seeds
# are validated on the same images and their metrics stay comparable.
VAL_SPLIT_SEED = 0


def split_validation(num_items: int, val_count: int, seed: int = VAL_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Hold out ``val_count`` items for validation.

    Args:
        num_items: size N of the source.
        val_count: how many to hold out (0: none).
        seed: split seed (fixed by default so different run seeds validate on the same images).

    Returns:
        (train indices, val indices), both sorted, disjoint, covering range(N).

    Raises:
        UserError: fewer than ``val_count + 1`` items (nothing left to train on).
    """
    if val_count < 0:
        raise UserError(f"data.val_count must be >= 0, got {val_count}")
    if val_count >= num_items:
        raise UserError(f"only {num_items} images: cannot hold out data.val_count={val_count} for validation "
                        "and still train (lower data.val_count or set data.val)")
    perm = torch.randperm(num_items, generator=seeded_generator(seed, "val-split")).tolist()
    val = sorted(perm[:val_count])
    held = set(val)
    return [i for i in range(num_items) if i not in held], val


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items, drop unreadable ones, and carry the failures along.

    Runs inside DataLoader workers, so skip information travels in the batch for the main process.

    Returns:
        ``{"pixels": (B',C,R,R) float32 in [-1,1] (None if no item was readable),
        "index": (B',) int64 source indices, "skipped": number of failed loads,
        "skipped_files": [(name, message), ...]}``.
    """
    good = [it for it in items if it["pixels"] is not None]
    failures = [s for it in items for s in it["skipped"]]
    return {
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "skipped": len(failures),
        "skipped_files": failures,
    }


class SkipLog:
    """Counts unreadable-image events in the main process and logs each file once.

    Args:
        path: optional text file; each newly seen bad file appends a ``name<TAB>message`` line.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.count = 0
        self.files: dict[str, str] = {}

    def record(self, name: str, message: str) -> None:
        self.count += 1
        if name in self.files:
            return
        self.files[name] = message
        log.warning("skipping unreadable image %s", message if name in message else f"{name}: {message}")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(f"{name}\t{' '.join(message.split())}\n")

    def update(self, batch: dict[str, Any]) -> None:
        """Record the failures a :func:`collate` batch carries."""
        for name, message in batch.get("skipped_files", ()):
            self.record(name, message)


class SkipLoggingLoader(DataLoader):
    """A DataLoader that feeds each batch's failures to a :class:`SkipLog` as batches come out.

    With ``require_pixels`` (training), a batch with no readable image at all raises a UserError:
    silently dropping it would shift every later step's data and break bit-exact resume.
    """

    def __init__(self, *args: Any, skip_log: SkipLog, require_pixels: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_log = skip_log
        self.require_pixels = require_pixels

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            self.skip_log.update(batch)
            if self.require_pixels and batch["pixels"] is None:
                example = batch["skipped_files"][0][1] if batch["skipped_files"] else "?"
                raise UserError(f"no readable image in a whole training batch ({self.skip_log.count} unreadable "
                                f"so far, e.g. {example}); check data.train")
            yield batch


@dataclass
class DataInfo:
    """What :func:`build_dataloaders` opened, for the run log (``str(info)`` is one line)."""

    train: str
    val: str
    train_images: int
    val_images: int
    global_batch: int
    steps_per_epoch: float
    skip_log: SkipLog = field(repr=False)

    def __str__(self) -> str:
        return (f"train {self.train} → {self.train_images:,} used, val {self.val} → {self.val_images:,} "
                f"images; global batch {self.global_batch}, {self.steps_per_epoch:,.1f} steps/epoch")


def build_dataloaders(cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start_step: int = 0, skip_log_path: str | Path | None = None,
                      cache_dir: str | None = None, channels: int = 3) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Training and validation loaders as configured.

    Args:
        cfg: the ``data`` section.
        batch_size: per-process micro-batch size B.
        seed: run seed (order and augmentation).
        rank, world_size: this process and the number of processes.
        start_step: micro-batches already consumed (``optimizer step × grad_accum`` at resume); the
            loader continues with exactly the next one.
        skip_log_path: where to append unreadable-file lines (None: log only).
        cache_dir: ``datasets`` cache folder (None: default).
        channels: the model's image channels (1 grayscale, 3 RGB, 4 RGBA): what images are decoded to.

    Returns:
        ``(train_loader, val_loader, info)``. The train loader is infinite and yields
        ``{"pixels": (B,C,R,R) in [-1,1], "index": (B,), "skipped": int, "skipped_files": [...]}``;
        the val loader is finite (center crops, batches of up to B, possibly zero batches).

    Raises:
        UserError: empty/invalid ``data.train``, too few images, or any :func:`open_source` error.
    """
    if not cfg.train:
        raise UserError("data.train is empty: set it to an image folder, a parquet file or a datasets name")
    train_source = open_source(cfg.train, cfg.image_column, cfg.split, cache_dir)
    if cfg.val:
        val_source = open_source(cfg.val, cfg.image_column, cfg.split, cache_dir)
        train_idx, val_idx = list(range(len(train_source))), list(range(len(val_source)))
        val_desc = val_source.describe()
    else:
        val_source = train_source
        train_idx, val_idx = split_validation(len(train_source), cfg.val_count)
        val_desc = f"{cfg.val_count} held out of train"

    train_ds = TrainDataset(train_source, cfg.resolution, cfg.resize, cfg.crop, cfg.flip, seed, train_idx,
                            mosaic=cfg.mosaic, mosaic_grids=cfg.mosaic_grids, color_cast=cfg.color_cast,
                            channels=channels)
    # Stream mode (no dropped tail): every image is used equally and tiny datasets still work.
    sampler = ResumableSampler(len(train_ds), batch_size, seed, rank, world_size, drop_last=False,
                               start_step=start_step)
    skip_log = SkipLog(skip_log_path)
    workers = max(0, cfg.num_workers)
    pin = cuda_available()
    # Private generators: starting an iterator draws a base seed, which must not come from (and
    # advance) the global torch RNG, or a resumed run's global RNG would run one draw ahead.
    train_loader = SkipLoggingLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                     persistent_workers=workers > 0, pin_memory=pin, skip_log=skip_log,
                                     require_pixels=True, generator=seeded_generator(seed, "train-loader"))
    val_ds = ValDataset(val_source, cfg.resolution, cfg.resize, val_idx, mosaic=cfg.mosaic, channels=channels)
    # Validation runs rarely; workers are started per pass instead of idling between passes.
    val_loader = SkipLoggingLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                   num_workers=min(workers, math.ceil(len(val_ds) / batch_size)),
                                   pin_memory=pin, skip_log=skip_log, generator=seeded_generator(seed, "val-loader"))
    info = DataInfo(train_source.describe(), val_desc, len(train_ds), len(val_ds), sampler.global_batch,
                    sampler.steps_per_epoch, skip_log)
    return train_loader, val_loader, info


def latent_stats_loader(cfg: DataConfig, batch_size: int, seed: int, train_count: int = 64,
                        cache_dir: str | None = None, channels: int = 3) -> DataLoader:
    """Center crops of the validation images plus a fixed sample of ``train_count`` training images
    (decoded to ``channels``, the model's image channels).

    What the final encoder's latent statistics (its ``scaling_factor``) are measured on: the sample is
    drawn with its own seeded generator (the same images in every run with this seed and data), never
    the validation images, and without augmentation or mosaics.
    """
    from torch.utils.data import ConcatDataset

    train_source = open_source(cfg.train, cfg.image_column, cfg.split, cache_dir)
    if cfg.val:
        val_source = open_source(cfg.val, cfg.image_column, cfg.split, cache_dir)
        train_idx, val_idx = list(range(len(train_source))), list(range(len(val_source)))
    else:
        val_source = train_source
        train_idx, val_idx = split_validation(len(train_source), cfg.val_count)
    order = torch.randperm(len(train_idx), generator=seeded_generator(seed, "latent-stats")).tolist()
    sample = sorted(train_idx[i] for i in order[:train_count])
    data = ConcatDataset([ValDataset(val_source, cfg.resolution, cfg.resize, val_idx, channels=channels),
                          ValDataset(train_source, cfg.resolution, cfg.resize, sample, channels=channels)])
    return SkipLoggingLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0,
                             skip_log=SkipLog(None))
