"""``sdvae encode-dataset``: encode an image collection into a latent dataset, resumably, on N processes.

The output's layout and format: :mod:`sdvae.latents.format`.

Why it is exact under ``kill -9``:

* The work is cut into fixed *shards* of S consecutive input indices; shard k belongs to rank
  ``k % world_size``. Both are pure functions of the arguments, so every run agrees on them.
* A shard is written in one piece (temporary name, fsync, rename: :func:`sdvae.atomic.atomic_file`)
  once all its images are encoded, its skip report first. A shard file therefore exists complete or
  not at all, and "done" simply means "its file exists": a rerun skips those and redoes the rest.
  Rows never live anywhere else, so there can be no duplicates.
* Random crops and posterior samples are drawn from generators seeded by (seed, input index), so a
  redone shard has the same content as the lost one would have had, whatever the process count.
* Whichever process finds every shard present at its end writes the dataset files (idempotent,
  deterministic content, atomic), so the last one to finish completes the dataset even if another
  was killed; a rerun with the same arguments finishes whatever is missing.

Decoding, resizing and cropping happen in DataLoader workers, overlapped with the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sdvae.atomic import write_json
from sdvae.errors import UserError
from sdvae.images.channels import describe_channels, model_channels
from sdvae.images.resize import center_offsets, crop_offsets, resize_shorter
from sdvae.images.sources import ImageSource
from sdvae.latents.buckets import BucketSet, bucket_options, crop_to_bucket, variant_identity, variant_meta
from sdvae.latents.flips import row_latents, with_flips
from sdvae.latents.format import (
    ARROW_DTYPES,
    DATASET_FORMAT,
    FIXED_COLUMNS,
    build_features,
    check_arguments,
    finalize,
    latent_columns,
    rgb_fit_path,
    shard_path,
    skip_path,
    write_shard,
)
from sdvae.latents.preview import rgb_fit_sums
from sdvae.latents.scaling import latent_normalization
from sdvae.model.info import config_dict, latent_space_hash, weights_hash
from sdvae.progress import Progress
from sdvae.seeding import seeded_generator

STORES = ("mean_logvar", "mean", "sample")
BUCKET_SUMMARY_KEYS = ("name", "area", "step", "spacing_log_ratio")  # of BucketSet.describe(), in the summary
CROPS = ("center", "random", "none")
# Test hook: seconds to sleep after each batch, so a test can kill a run mid-shard deterministically.


@dataclass
class EncodeOptions:
    """Arguments of one ``encode-dataset`` run (the CLI flags of the same names).

    ``resolution`` 0 keeps every image's own size; ``crop`` None means ``center`` with a resolution and
    ``none`` without. ``carry`` None carries every non-image column of a dataset source.
    """

    src: str
    out: str
    model: str
    resolution: int = 0
    crop: str | None = None
    batch_size: int = 16
    dtype: str = "auto"
    store: str = "mean_logvar"
    num_workers: int = 0
    shard_size: int = 1000
    image_column: str = "image"
    split: str = "train"
    carry: tuple[str, ...] | None = None
    seed: int = 0
    buckets: str | None = None  # aspect-ratio buckets: "sdxl" or an area side ("256"); see latents.buckets
    bucket_step: int | None = None  # None: about 1/16 of the bucket side (latents.buckets.default_bucket_step)
    hflip: str = "none"  # "both": also store the latents of the mirrored image (latents.flips)
    device: str | None = None
    cache_dir: str | None = None
    progress: bool = True


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by ``torchrun`` / ``accelerate launch`` (0, 1, 0 otherwise).

    No process group is needed: shards are assigned by rank and every process writes its own files.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UserError(f"bad RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


# --------------------------------------------------------------------------------------------------
# Preprocessing (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------


def crop_for_encoding(image: torch.Tensor, resolution: int, crop: str, factor: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """Resize and crop one image for encoding.

    Args:
        image: (C,H,W) float32 in [-1,1].
        resolution: shorter side after resizing (bicubic, antialiased; 0: keep the size).
        crop: ``center``/``random``: a resolution×resolution crop; ``none``: keep the whole image except
            for the (< factor) pixels that make a side not a multiple of ``factor``, trimmed evenly.
        factor: the VAE's downsampling factor.
        generator: draws the ``random`` crop offsets.

    Returns:
        (pixels (C,h,w) float32 in [-1,1], resized size [H', W'], crop box [top, left, h, w] in the
        resized image).

    Raises:
        UserError: the image is smaller than one latent cell (``crop none`` only); the message has no
            file name (the caller adds it).
    """
    if resolution:
        image = resize_shorter(image, resolution)
    h, w = image.shape[-2:]
    if crop == "none":
        ch, cw = h - h % factor, w - w % factor
        if not ch or not cw:
            raise UserError(f"image is {w}×{h} pixels, smaller than one latent cell of this model ({factor}×{factor})")
        top, left = center_offsets(h, w, (ch, cw))
    else:
        ch = cw = resolution
        top, left = crop_offsets(h, w, (ch, cw), random=crop == "random", generator=generator)
    pixels = image[:, top:top + ch, left:left + cw].float().contiguous()
    return pixels, [int(h), int(w)], [int(top), int(left), int(ch), int(cw)]


class _Items(Dataset):
    """Input index → ``{"index", "key", "name", "pixels" | "error", sizes, "crop_box", "extras"}``."""

    def __init__(self, source: ImageSource, resolution: int, crop: str, factor: int, seed: int,
                 buckets: BucketSet | None = None, channels: int = 3):
        self.source, self.resolution, self.crop, self.factor, self.seed = source, resolution, crop, factor, seed
        self.buckets, self.channels = buckets, channels  # channels: the model's (1, 3 or 4)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        src = self.source
        item: dict[str, Any] = {"index": index, "key": src.key(index), "name": src.name(index)}
        try:
            image = src.load(index, self.channels)  # its errors name the input
        except UserError as err:  # unreadable: reported, never fatal
            item["error"] = str(err)
            return item
        generator = seeded_generator(self.seed, "encode-crop", index) if self.crop == "random" else None
        try:
            if self.buckets is not None:
                item["bucket"] = list(self.buckets.assign(*image.shape[-2:]))
                pixels, resized, box = crop_to_bucket(image, item["bucket"], self.crop, generator)
            else:
                pixels, resized, box = crop_for_encoding(image, self.resolution, self.crop, self.factor, generator)
        except UserError as err:  # e.g. smaller than one latent cell: skipped like an unreadable input
            item["error"] = f"{item['name']}: {err}"
            return item
        item.update(pixels=pixels, original_size=[int(s) for s in image.shape[-2:]], resized_size=resized,
                    crop_box=box, extras=src.extras(index))
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch in the worker, one stack per image size (sizes differ only with ``--crop none``).

    Returns:
        ``{"groups": [((b,C,h,w) float32 in [-1,1], [item without pixels] * b), ...], "items": every
        item of the batch (input order), "first": the batch's first input index}``.
    """
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        if "pixels" in item:
            groups.setdefault(tuple(item["pixels"].shape), []).append(item)
    stacked = [(torch.stack([it.pop("pixels") for it in group]), group) for group in groups.values()]
    return {"groups": stacked, "items": items, "first": items[0]["index"]}


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _batches(pending: list[int], num_inputs: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches of the pending shards, in order; a batch never straddles two shards."""
    out = []
    for k in pending:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, num_inputs)))
        out.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    return out


def _encode_batch(codec: Any, batch: dict[str, Any], store: str, dtype: str, seed: int,
                  hflip: str = "none") -> None:
    """Encode the readable items of a collated batch in place (adds ``latents``: column → flat numpy array).

    With ``hflip`` ``both`` the mirrored pixels are encoded in the same model call and stored under
    the ``*_flip`` columns (:mod:`sdvae.latents.flips`).
    """
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for pixels, group in batch["groups"]:
        enc = codec.encode(with_flips(pixels, hflip))  # (b or 2b,C,h,w) float32 moments
        mean, logvar = enc.mean.cpu(), enc.logvar.cpu()
        own = mean[: len(pixels)]  # the preview map is fitted on the images as given (not the mirrored copies)
        xtx, xty = rgb_fit_sums(own, pixels)
        batch["rgb_fit"] = _add_fit(batch.get("rgb_fit"), {"xtx": xtx, "xty": xty, "cells": own[:, 0].numel()})
        for j, item in enumerate(group):
            tensors = row_latents(mean, logvar, j, len(group), store, seed, item["index"], hflip)
            item["shape"] = list(mean[j].shape)
            item["latents"] = {name: _to_numpy(t.to(target)) for name, t in tensors.items()}


def _add_fit(total: dict[str, Any] | None, sums: dict[str, Any] | None) -> dict[str, Any] | None:
    """Add up preview-map fit sums ``{"xtx", "xty", "cells"}`` (see :func:`sdvae.latents.preview.rgb_fit_sums`)."""
    if total is None or sums is None:
        return sums if total is None else total
    return {key: total[key] + sums[key] for key in ("xtx", "xty", "cells")}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Flat numpy view of a latent in its storage type (bf16 → its uint16 bit patterns)."""
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _dataset_meta(opts: EncodeOptions, identity: dict[str, Any], source: ImageSource, vae: Any,
                  factor: int) -> dict[str, Any]:
    """The dataset-level metadata (``sdvae_latents.json`` and the dataset info's description)."""
    crop, config = identity["crop"], config_dict(vae)
    return {
        "format": DATASET_FORMAT, "source": source.describe(), "src": identity["src"], "num_inputs": len(source),
        "model": opts.model, "config_hash": identity["config_hash"], "arch_hash": latent_space_hash(config),
        "config": config, "downsampling_factor": factor,
        "preprocessing": {"resolution": opts.resolution, "crop": crop, "seed": opts.seed,
                          "resize": "shorter side to resolution, bicubic, antialiased, clamped to [-1,1]"
                          if opts.resolution else "none (each image at its own size)",
                          "trim": "whole image; sides trimmed (centred) to multiples of the downsampling factor"
                          if crop == "none" else None,
                          "input_range": f"[-1,1], {describe_channels(model_channels(config))}; EXIF rotation "
                          "applied"},
        "store": opts.store, "dtype": opts.dtype, "latent_columns": latent_columns(opts.store, opts.hflip),
        "storage": f"flat lists of {ARROW_DTYPES[opts.dtype]}, reshaped by the row's `shape` (C,h,w)"
        + (" (raw bfloat16 bit patterns)" if opts.dtype == "bf16" else ""),
        "carried_columns": list(source.carry), "sizes": "[height, width]; crop_box [top, left, height, width] "
        "in the resized image",
        "scaled": False, "scaling": latent_normalization(vae),  # FLUX.2: with its BatchNorm statistics
    }


def run_encode(opts: EncodeOptions) -> dict[str, Any]:
    """Encode this process's share of the pending shards; complete the dataset if this is the last process.

    Returns:
        A summary: ``rank``, ``world_size``, ``encoded`` (images this process encoded), ``unreadable``
            (inputs it could not read; ``images_per_s`` counts both, as both were read),
        ``seconds``, ``images_per_s``, ``shards_total``, ``shards_done_before``, ``shards_encoded``,
        ``complete``, and when complete ``rows``/``skipped`` (whole dataset), ``out``.

    Raises:
        UserError: bad arguments, an unusable source/model, or an output made with other arguments.
    """
    from sdvae.codec.codec import Codec
    from sdvae.device import resolve_device
    from sdvae.images.sources import open_source
    from sdvae.model.dtypes import resolve_dtype
    from sdvae.model.info import config_hash, downsample_factor, scaled_factor
    from sdvae.model.load import load_vae

    rank, world, local_rank = dist_env()
    device = resolve_device(opts.device, local_rank)
    opts = dataclasses.replace(opts, dtype=resolve_dtype(opts.dtype, device))  # "auto" → what this device runs
    crop = _checked_crop(opts)
    source = open_source(opts.src, opts.image_column, opts.split, opts.cache_dir, carry=opts.carry)
    clash = [c for c in source.carry if c in FIXED_COLUMNS]
    if clash:
        raise UserError(f"{opts.src}: column(s) {', '.join(clash)} would clash with output columns; "
                        "leave them out with --carry")
    vae = load_vae(opts.model)
    # Sides are multiples of the scaled-latent cell: 16 for FLUX.2 (its latents are patchified 2×2).
    factor, channels = scaled_factor(vae), model_channels(vae.config)
    if crop != "none" and opts.resolution % factor:
        raise UserError(f"--resolution {opts.resolution} is not a multiple of the downsampling factor {factor}"
                        + (" (8, then FLUX.2's 2x2 latent patches)" if factor != downsample_factor(vae) else ""))
    buckets = bucket_options(opts.buckets, opts.bucket_step, opts.hflip, opts.resolution, crop, factor)
    local_src = Path(opts.src).expanduser()
    num_inputs = len(source)
    identity = json.loads(json.dumps({
        "format": DATASET_FORMAT, "src": str(local_src.resolve()) if local_src.exists() else opts.src,
        "source": source.fingerprint(), "num_inputs": num_inputs, "image_column": opts.image_column,
        "split": opts.split, "carry": list(source.carry), "model": opts.model, "config_hash": config_hash(vae),
        "weights_hash": weights_hash(vae), "resolution": opts.resolution, "crop": crop, "dtype": opts.dtype,
        "store": opts.store, "seed": opts.seed, "shard_size": opts.shard_size,
        "num_shards": math.ceil(num_inputs / opts.shard_size), **variant_identity(buckets, opts.hflip)}))
    out = Path(opts.out)
    check_arguments(out, identity)
    features = build_features(opts.store, opts.dtype, source.extra_features(), opts.hflip, buckets is not None)
    meta = variant_meta(_dataset_meta(opts, identity, source, vae, downsample_factor(vae)), buckets, opts.hflip)

    num_shards = identity["num_shards"]
    mine = list(range(rank, num_shards, world))
    pending = [k for k in mine if not shard_path(out, k).is_file()]
    batches = _batches(pending, num_inputs, opts.shard_size, opts.batch_size)
    left = {k: 0 for k in pending}
    for batch in batches:
        left[batch[0] // opts.shard_size] += 1
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "shards_total": num_shards,
                               "shards_done_before": len(mine) - len(pending), "shards_encoded": 0,
                               "encoded": 0, "unreadable": 0}
    codec = Codec(vae, device=device, dtype=opts.dtype, tile="auto")
    dataset = _Items(source, opts.resolution, crop, factor, opts.seed, buckets, channels)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_collate, num_workers=opts.num_workers,
                        prefetch_factor=4 if opts.num_workers else None, pin_memory=device.type == "cuda")
    total = sum(len(b) for b in batches)
    bar = Progress(total, f"encode (rank {rank}/{world})" if world > 1 else "encode",
                   enabled=opts.progress and rank == 0 and bool(total))
    # Shards are written by one background thread (Arrow + fsync release the GIL), so the model does not
    # wait on the disk; at most two finished shards wait in memory.
    writer, writing = ThreadPoolExecutor(max_workers=1), deque()
    start = time.perf_counter()
    try:
        # An empty batch sampler (nothing pending here) must not start workers.
        _encode_loop(iter(loader) if batches else iter(()), codec, opts, out, features, left, summary, bar, writer,
                     writing)
    except BaseException:
        _wait_for_writes(writing, writer)  # no write still running when the error reaches the caller
        raise
    failed = _wait_for_writes(writing, writer)
    if failed is not None:
        raise failed
    bar.close()
    seconds = time.perf_counter() - start
    read = summary["encoded"] + summary["unreadable"]
    summary.update(seconds=round(seconds, 3), images_per_s=round(read / seconds, 2) if seconds else 0.0,
                   notes=[*source.notes, *codec.notes], out=str(out))
    _complete(summary, out, identity, features, meta, buckets)
    return summary


def _checked_crop(opts: EncodeOptions) -> str:
    """The crop mode in force (``--crop`` or its default), after checking the options that need no model.

    Raises:
        UserError: an unknown crop/store, a negative or zero size, or a crop without a crop size.
    """
    crop = opts.crop or ("center" if opts.resolution or opts.buckets else "none")
    if crop not in CROPS or opts.store not in STORES:
        raise UserError(f"bad option: crop {crop!r}, store {opts.store!r} or dtype {opts.dtype!r}")
    if opts.resolution < 0 or opts.batch_size < 1 or opts.shard_size < 1 or opts.num_workers < 0:
        raise UserError("--resolution must be >= 0, --batch-size and --shard-size >= 1, --num-workers >= 0")
    if crop != "none" and not opts.resolution and not opts.buckets:
        raise UserError(f"--crop {crop} needs --resolution N (the crop size)")
    return crop


def _complete(summary: dict[str, Any], out: Path, identity: dict[str, Any], features: Any, meta: dict[str, Any],
              buckets: BucketSet | None) -> None:
    """Write the dataset files if every shard is present, and add the outcome to ``summary``: ``complete``,
    then ``rows``/``skipped`` (and the bucket histogram) or ``shards_missing``; ``bucket_set`` with buckets."""
    final = finalize(out, identity, features, meta)
    summary["complete"] = final is not None
    if final is not None:
        summary.update(rows=final["rows"], skipped=final["skipped"])
        if "bucket_histogram" in final:
            summary["buckets"] = final["bucket_histogram"]
    else:
        summary["shards_missing"] = sum(not shard_path(out, k).is_file() for k in range(identity["num_shards"]))
    if buckets is not None:
        summary["bucket_set"] = {k: v for k, v in buckets.describe().items() if k in BUCKET_SUMMARY_KEYS}


def _wait_for_writes(writing: deque, writer: ThreadPoolExecutor) -> BaseException | None:
    """Wait for every shard write handed to ``writer`` (even after one failed); the first failure, if any."""
    failed = None
    while writing:
        try:
            writing.popleft().result()
        except BaseException as err:  # the first one is re-raised by the caller
            failed = failed or err
    writer.shutdown()
    return failed


def _encode_loop(batches: Iterator[dict[str, Any]], codec: Any, opts: EncodeOptions, out: Path, features: Any,
                 left: dict[int, int], summary: dict[str, Any], bar: Any, writer: ThreadPoolExecutor,
                 writing: deque) -> None:
    """Encode the batches; hand each shard to the writer thread as soon as its last batch is encoded."""
    rows: dict[int, list[dict[str, Any]]] = {k: [] for k in left}
    fits: dict[int, dict[str, Any] | None] = {k: None for k in left}
    skipped: dict[int, list[dict[str, Any]]] = {k: [] for k in left}
    for batch in batches:
        k = batch["first"] // opts.shard_size
        _encode_batch(codec, batch, opts.store, opts.dtype, opts.seed, opts.hflip)
        items = batch["items"]
        fits[k] = _add_fit(fits[k], batch.get("rgb_fit"))
        for item in items:
            if "error" in item:
                skipped[k].append({"index": item["index"], "name": item["name"], "reason": item["error"]})
                if summary["unreadable"] < 20:
                    bar.write(f"sdvae: skipping {item['error']}")
                summary["unreadable"] += 1
            else:
                rows[k].append(item)
                summary["encoded"] += 1
        left[k] -= 1
        if left[k] == 0:  # the shard is complete
            writing.append(writer.submit(_write_finished_shard, out, k, rows.pop(k), skipped.pop(k), features,
                                         fits.pop(k)))
            summary["shards_encoded"] += 1
            while len(writing) > 2:
                writing.popleft().result()
        bar.update(len(items))


def _write_finished_shard(out: Path, k: int, rows: list[dict[str, Any]], skipped: list[dict[str, Any]],
                          features: Any, fit: dict[str, Any] | None = None) -> None:
    # The skip report and preview-map sums first, then the rows: the rows file is what marks the shard as done.
    if skipped:
        write_json(skip_path(out, k), skipped)
    write_json(rgb_fit_path(out, k), {"cells": 0} if fit is None else
               {"cells": fit["cells"], "xtx": fit["xtx"].tolist(), "xty": fit["xty"].tolist()})
    write_shard(shard_path(out, k), rows, features)
