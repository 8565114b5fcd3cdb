"""One ``encode-dataset`` job, whatever runs it: its options, identity and units, and encoding a unit.

The inputs and work units: :mod:`sdvae.latents.encode_inputs`; the output's layout and format:
:mod:`sdvae.latents.format`. The engines that run units: :mod:`sdvae.latents.export` (this process, or each
process of ``torchrun``) and :mod:`sdvae.latents.ray_engine` (Ray Data).

Why it is exact under ``kill -9``:

* The work is cut into fixed *units* (S consecutive inputs of an indexed source, or one input shard of a
  sharded one); unit k belongs to rank ``k % world_size``. Both are pure functions of the arguments, so every
  run agrees on them; any process (or Ray worker) can do any unit.
* A unit is written in one piece (local: temporary name, fsync, rename; object store: one PUT) once all its
  images are encoded, its skip report and info first. A unit's rows file therefore exists complete or not at
  all, and "done" simply means "its file exists": a rerun skips those and redoes the rest. Rows never live
  anywhere else, so there can be no duplicates.
* Random crops and posterior samples are drawn from generators seeded by (seed, input index), so a
  redone unit has the same content as the lost one would have had, whatever the process count or engine.
* Whichever process finds every unit present at its end writes the dataset files (idempotent,
  deterministic content, atomic), so the last one to finish completes the dataset even if another
  was killed; a rerun with the same arguments finishes whatever is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdvae.errors import UserError
from sdvae.images.channels import describe_channels, model_channels
from sdvae.images.image_source import ImageSource
from sdvae.latents.buckets import BucketSet, bucket_options, variant_identity, variant_meta
from sdvae.latents.encode_inputs import IndexedItems, Preprocess, collate, indexed_batches, tag_indexed, unit_batches
from sdvae.latents.encode_rows import add_fit, encode_batch
from sdvae.latents.format import (
    ARROW_DTYPES,
    DATASET_FORMAT,
    FIXED_COLUMNS,
    build_features,
    check_arguments,
    done_parts,
    done_units,
    finalize,
    latent_columns,
    write_done_marker,
    write_unit,
)
from sdvae.latents.scaling import latent_normalization
from sdvae.model.info import config_dict, latent_space_hash, weights_hash
from sdvae.storage.urls import is_url, redact

STORES = ("mean_logvar", "mean", "sample")
BUCKET_SUMMARY_KEYS = ("name", "area", "step", "spacing_log_ratio")  # of BucketSet.describe(), in the summary
CROPS = ("center", "random", "none")
ENGINES = ("torchrun", "ray")


@dataclass
class EncodeOptions:
    """Arguments of one ``encode-dataset`` run (the CLI flags of the same names).

    ``resolution`` 0 keeps every image's own size; ``crop`` None means ``center`` with a resolution and
    ``none`` without. ``carry`` None carries every non-image column of a dataset source. ``src`` and ``out`` may
    be fsspec URLs (``s3://…``); ``shard_size`` sizes the units of indexed sources only (a sharded source's unit
    is one input shard).
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
    format: str = "arrow"  # "webdataset": tar shards (latents.webdataset_format)
    part_size: int = 0  # sharded sources: split each input shard's output into parts of this many samples
    streaming: bool = False  # a datasets reference (hub name, folder) streamed shard by shard (images.datasets_stream)
    engine: str = "torchrun"  # "ray": Ray Data on a local or running cluster (latents.ray_engine)
    compile: bool = False  # torch.compile the encoder (Codec(compile=True)): one graph per batch shape
    ray_workers: int | None = None  # --engine ray: encoder actors (None: one per GPU of the cluster, or 1 on CPUs)
    device: str | None = None
    cache_dir: str | None = None
    progress: bool = True


@dataclass
class Job:
    """What every process of a run agrees on: the source, the preprocessing, the units and the output."""

    opts: EncodeOptions  # dtype resolved for the device
    source: Any  # ImageSource (indexed) or ShardedSource (sharded)
    sharded: bool
    prep: Preprocess
    identity: dict[str, Any]
    features: Any
    meta: dict[str, Any]
    buckets: BucketSet | None

    @property
    def out(self) -> str:
        return self.opts.out

    @property
    def num_units(self) -> int:
        return int(self.identity["num_shards"])

    @property
    def num_inputs(self) -> int:
        return len(self.source)

    @property
    def part_size(self) -> int:
        """Samples per output part of a sharded source's unit (0: one piece per unit)."""
        return int(self.identity.get("part_size") or 0)

    def done_units(self) -> set[int]:
        """The finished units (one listing of the output)."""
        return done_units(self.out, self.num_units, self.opts.format, parted=bool(self.part_size))

    def done_parts(self, units: list[int]) -> dict[int, set[int]]:
        """For each of ``units`` (unfinished), the parts already written (empty sets without parts)."""
        return done_parts(self.out, units, self.opts.format) if self.part_size else {k: set() for k in units}


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by ``torchrun`` / ``accelerate launch`` (0, 1, 0 otherwise).

    No process group is needed: units are assigned by rank and every process writes its own files.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UserError(f"bad RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _open_input(opts: EncodeOptions) -> tuple[Any, bool]:
    """The run's source and whether it is sharded (tar/parquet shards or ``--streaming``: streamed, one unit per
    shard)."""
    from sdvae.images.shard_stream import ShardedSource, is_sharded_reference
    from sdvae.images.sources import open_source

    if opts.streaming:
        from sdvae.images.datasets_stream import DatasetsStreamSource

        return DatasetsStreamSource(opts.src, carry=opts.carry, image_column=opts.image_column, split=opts.split,
                                    cache_dir=opts.cache_dir), True
    if is_sharded_reference(opts.src):
        return ShardedSource(opts.src, carry=opts.carry, image_column=opts.image_column), True
    if is_url(opts.src):
        raise UserError(f"{redact(opts.src)}: a URL source must name tar or parquet shards (a file, "
                        "{00000..00099}.tar, a glob or a .txt list)")
    return open_source(opts.src, opts.image_column, opts.split, opts.cache_dir, carry=opts.carry), False


def prepare_job(opts: EncodeOptions, device: torch.device) -> tuple[Job, Any]:
    """Check the options, open the source and the model, and record (or check) the run's identity in the output.

    Returns:
        (the job, the loaded VAE).

    Raises:
        UserError: bad arguments, an unusable source/model, or an output made with other arguments.
    """
    from sdvae.model.dtypes import resolve_dtype
    from sdvae.model.info import config_hash, downsample_factor, scaled_factor
    from sdvae.model.load import load_vae

    opts = dataclasses.replace(opts, dtype=resolve_dtype(opts.dtype, device))  # "auto" → what this device runs
    crop = _checked_crop(opts)
    source, sharded = _open_input(opts)
    clash = [c for c in source.carry if c in FIXED_COLUMNS]
    if clash:
        raise UserError(f"{redact(opts.src)}: column(s) {', '.join(clash)} would clash with output columns; "
                        "leave them out with --carry")
    vae = load_vae(opts.model)
    # Sides are multiples of the scaled-latent cell: 16 for FLUX.2 (its latents are patchified 2×2).
    factor, channels = scaled_factor(vae), model_channels(vae.config)
    if crop != "none" and opts.resolution % factor:
        raise UserError(f"--resolution {opts.resolution} is not a multiple of the downsampling factor {factor}"
                        + (" (8, then FLUX.2's 2x2 latent patches)" if factor != downsample_factor(vae) else ""))
    buckets = bucket_options(opts.buckets, opts.bucket_step, opts.hflip, opts.resolution, crop, factor)
    local_src = Path(opts.src).expanduser()
    num_units = len(source) if sharded else math.ceil(len(source) / opts.shard_size)
    identity = json.loads(json.dumps({
        "format": DATASET_FORMAT,
        "src": str(local_src.resolve()) if not is_url(opts.src) and local_src.exists() else redact(opts.src),
        "source": source.fingerprint(), "num_inputs": None if sharded else len(source),
        "image_column": opts.image_column, "split": opts.split, "carry": list(source.carry), "model": opts.model,
        "config_hash": config_hash(vae), "weights_hash": weights_hash(vae), "resolution": opts.resolution,
        "crop": crop, "dtype": opts.dtype, "store": opts.store, "seed": opts.seed,
        "shard_size": None if sharded else opts.shard_size, "num_shards": num_units,
        **variant_identity(buckets, opts.hflip),
        **({"layout": opts.format} if opts.format != "arrow" else {}),  # absent: arrow (older outputs resume)
        **({"part_size": opts.part_size} if sharded and opts.part_size else {})}))
    check_arguments(opts.out, identity)
    features = build_features(opts.store, opts.dtype, source.extra_features(), opts.hflip, buckets is not None)
    meta = variant_meta(_dataset_meta(opts, identity, source, vae, downsample_factor(vae)), buckets, opts.hflip)
    prep = Preprocess(opts.resolution, crop, factor, opts.seed, buckets, channels)
    return Job(opts, source, sharded, prep, identity, features, meta, buckets), vae


def encode_unit(job: Job, codec: Any, k: int) -> dict[str, Any]:
    """Encode and write unit ``k`` in this process, preprocessing inline (the Ray engine's task).

    Returns:
        ``{"unit", "encoded", "unreadable", "notes"}``.
    """
    opts = job.opts
    if job.sharded:
        batches = unit_batches(job.source, k, job.prep, opts.batch_size, job.part_size, job.done_parts([k])[k])
    else:
        items = IndexedItems(job.source, job.prep)
        plan = indexed_batches([k], job.num_inputs, opts.shard_size, opts.batch_size)
        batches = tag_indexed((collate([items[i] for i in b]) for b in plan), plan, opts.shard_size,
                              job.num_inputs)
    summary: dict[str, Any] = {"shards_encoded": 0, "encoded": 0, "unreadable": 0}
    notes: list[str] = []
    encode_loop(batches, codec, job, summary, None, notes, lambda write, *args: write(*args))
    return {"unit": k, "encoded": summary["encoded"], "unreadable": summary["unreadable"], "notes": notes}


def encode_loop(batches: Iterator[dict[str, Any]], codec: Any, job: Job, summary: dict[str, Any], bar: Any,
                 notes: list[str], submit: Any) -> None:
    """Encode the batches; hand each unit to ``submit(write, *args)`` as soon as its last batch is encoded."""
    rows: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    fits: dict[tuple[int, int | None], dict[str, Any] | None] = {}
    skipped: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    opts = job.opts
    summary.setdefault("waiting_s", 0.0)
    asked = time.perf_counter()
    for batch in batches:
        summary["waiting_s"] += time.perf_counter() - asked  # the model idle, waiting for preprocessed data
        piece = (batch["unit"], batch["part"])  # a unit, or one part of it (--part-size)
        encode_batch(codec, batch, opts.store, opts.dtype, opts.seed, opts.hflip)
        fits[piece] = add_fit(fits.get(piece), batch.get("rgb_fit"))
        for item in batch["items"]:
            if "error" in item:
                skipped.setdefault(piece, []).append({"index": item["index"], "name": item["name"],
                                                      "reason": item["error"]})
                if summary["unreadable"] < 20 and bar is not None:
                    bar.write(f"sdvae: skipping {item['error']}")
                summary["unreadable"] += 1
            else:
                rows.setdefault(piece, []).append(item)
                summary["encoded"] += 1
        notes.extend(batch["notes"])
        if batch["marker_only"]:  # a resumed unit whose parts were all written: only its done marker is missing
            submit(write_done_marker, job.out, batch["unit"], batch["part"] + 1)
        elif batch["last"]:  # the unit (or part) is complete
            submit(write_finished_unit, job.out, piece, rows.pop(piece, []), skipped.pop(piece, []), job.features,
                   fits.pop(piece, None), opts.format, batch["final"])
        if batch["final"]:
            summary["shards_encoded"] += 1
        if bar is not None:
            bar.update(len(batch["items"]))
        asked = time.perf_counter()


def write_finished_unit(out: str, piece: tuple[int, int | None], rows: list[dict[str, Any]],
                        skipped: list[dict[str, Any]], features: Any, fit: dict[str, Any] | None = None,
                        layout: str = "arrow", final: bool = True) -> None:
    """Write a finished unit, or part of one: ``piece`` is (unit, part or None)."""
    write_unit(out, piece[0], rows, skipped, features, layout, fit, part=piece[1], final=final)


def _dataset_meta(opts: EncodeOptions, identity: dict[str, Any], source: ImageSource, vae: Any,
                  factor: int) -> dict[str, Any]:
    """The dataset-level metadata (``sdvae_latents.json`` and the dataset info's description)."""
    crop, config = identity["crop"], config_dict(vae)
    return {
        "format": DATASET_FORMAT, "source": source.describe(), "src": identity["src"],
        "num_inputs": identity["num_inputs"], "model": opts.model, "config_hash": identity["config_hash"],
        "arch_hash": latent_space_hash(config),
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


def _checked_crop(opts: EncodeOptions) -> str:
    """The crop mode in force (``--crop`` or its default), after checking the options that need no model.

    Raises:
        UserError: an unknown crop/store, a negative or zero size, or a crop without a crop size.
    """
    crop = opts.crop or ("center" if opts.resolution or opts.buckets else "none")
    if crop not in CROPS or opts.store not in STORES:
        raise UserError(f"bad option: crop {crop!r}, store {opts.store!r} or dtype {opts.dtype!r}")
    if opts.resolution < 0 or opts.batch_size < 1 or opts.shard_size < 1 or opts.num_workers < 0 \
            or opts.part_size < 0:
        raise UserError("--resolution must be >= 0, --batch-size and --shard-size >= 1, --num-workers and "
                        "--part-size >= 0")
    if crop != "none" and not opts.resolution and not opts.buckets:
        raise UserError(f"--crop {crop} needs --resolution N (the crop size)")
    return crop


def complete(summary: dict[str, Any], job: Job) -> None:
    """Write the dataset files if every unit is present, and add the outcome to ``summary``: ``complete``,
    then ``rows``/``skipped`` (and the bucket histogram) or ``shards_missing``; ``bucket_set`` with buckets."""
    final = finalize(job.out, job.identity, job.features, job.meta)
    summary["complete"] = final is not None
    if final is not None:
        summary.update(rows=final["rows"], skipped=final["skipped"])
        if "bucket_histogram" in final:
            summary["buckets"] = final["bucket_histogram"]
    else:
        summary["shards_missing"] = job.num_units - len(job.done_units())
    if job.buckets is not None:
        summary["bucket_set"] = {k: v for k, v in job.buckets.describe().items() if k in BUCKET_SUMMARY_KEYS}
