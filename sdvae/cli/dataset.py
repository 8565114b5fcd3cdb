"""``sdvae encode-dataset`` and ``sdvae latent-stats``: an image source to a latent dataset, and its statistics."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from sdvae.cli.options import INPUT_NOTES, MODEL_HELP, default_model, require_data_extra
from sdvae.model.dtypes import DTYPE_CHOICES


def cmd_encode_dataset(args: argparse.Namespace) -> int:
    require_data_extra("sdvae encode-dataset")
    from sdvae.latents.export import EncodeOptions, run_encode
    from sdvae.storage.urls import join

    carry = None if args.carry is None else tuple(c.strip() for c in args.carry.split(",") if c.strip())
    opts = EncodeOptions(
        src=args.src, out=args.out, model=args.model or default_model(), resolution=args.resolution, crop=args.crop,
        batch_size=args.batch_size, dtype=args.dtype, store=args.store, num_workers=args.num_workers,
        shard_size=args.shard_size, image_column=args.image_column, split=args.split, carry=carry, seed=args.seed,
        device=args.device, progress=not args.no_progress, format=args.format, engine=args.engine,
        part_size=args.part_size, ray_workers=args.ray_workers, compile=args.compile,
        streaming=args.streaming, **_bucket_flip_options(args))
    summary = run_encode(opts)
    if args.json:
        print(json.dumps(summary))
        return 0
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    who = f"rank {summary['rank']}/{summary['world_size']}: " if summary["world_size"] > 1 else ""
    if summary.get("engine") == "ray":
        who = f"{summary['ray_workers']} Ray worker(s): "
    print(f"{who}encoded {summary['encoded']:,} image(s) ({summary['unreadable']} unreadable) in "
          f"{summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s; "
          f"{summary['shards_encoded']} shard(s) written, {summary['shards_done_before']} already done")
    if "bucket_set" in summary:
        _print_bucket_set(summary["bucket_set"])
    if summary["complete"]:
        _print_buckets(summary.get("buckets"))
        skipped = join(summary["out"], "skipped.txt")
        print(f"complete: {summary['rows']:,} rows in {summary['out']}"
              + (f"; {summary['skipped']} unreadable input(s) listed in {skipped}" if summary["skipped"] else ""))
    else:
        print(f"{summary['shards_missing']} shard(s) still missing (other processes are on them, or were stopped: "
              "run the same command again to finish)")
    return 0


def cmd_latent_stats(args: argparse.Namespace) -> int:
    require_data_extra("sdvae latent-stats")
    from sdvae.errors import UserError
    from sdvae.latents.format import read_dataset_meta
    from sdvae.latents.stats import compute_latent_stats, write_bn_statistics, write_scaling_config

    stats = compute_latent_stats(args.dataset, over=args.over)
    written = None
    if args.write_config and stats.patchified:  # FLUX.2: the statistics go into the BatchNorm buffers
        if args.per_channel:
            raise UserError(f"{args.dataset}: --per-channel does not apply to FLUX.2 (its BatchNorm statistics "
                            "are per channel already)")
        written = write_bn_statistics(args.write_config, stats)
    elif args.write_config:
        written = write_scaling_config(args.write_config, stats, per_channel=args.per_channel)
    if args.json:
        result = stats.to_dict()
        if written:
            result["written"] = {"config": str(written[0]), **written[1]}
        print(json.dumps(result))
        return 0
    what = {"posterior": "posterior (means + exp(logvar))", "mean": "posterior means", "sample": "stored samples"}
    print(f"{args.dataset}: {stats.rows:,} rows, {len(stats.channel_mean)} "
          f"{'2x2-patchified (FLUX.2) ' if stats.patchified else ''}channels x "
          f"{stats.values_per_channel:,} values, over the {what[stats.over]}")
    print(f"{'channel':>8} {'mean':>12} {'std':>12}")
    for c, (m, sd) in enumerate(zip(stats.channel_mean, stats.channel_std, strict=True)):
        print(f"{c:>8} {m:>12.6f} {sd:>12.6f}")
    print(f"{'all':>8} {stats.mean:>12.6f} {stats.std:>12.6f}")
    used = read_dataset_meta(args.dataset)["scaling"]
    if stats.patchified:
        print("FLUX.2: the channel means and variances are the BatchNorm running statistics (bn.running_mean, "
              "bn.running_var) that normalise these latents; in force at encode time: the model's own")
    else:
        print(f"recommended: scaling_factor = 1/std = {stats.scaling_factor:.6f}, shift_factor = mean = "
              f"{stats.shift_factor:.6f}")
        print(f"in force at encode time: scaling_factor {used['scaling_factor']}, shift_factor "
              f"{used['shift_factor']}" + (", latents_mean/latents_std set" if used.get("latents_mean") is not None
                                           else ""))
    if written and stats.patchified:
        print(f"wrote bn.running_mean, bn.running_var (the BatchNorm buffers, not config.json) into {written[0]}, "
              "rewritten atomically with every other tensor unchanged")
    elif written:
        print(f"wrote {', '.join(written[1])} to {written[0]}")
    _print_buckets(stats.buckets)
    return 0


def _bucket_flip_options(args: argparse.Namespace) -> dict:
    return {"buckets": args.buckets, "bucket_step": args.bucket_step, "hflip": args.hflip}


def _print_bucket_set(described: dict) -> None:
    """The set's side step and spacing: how far from its own aspect ratio an image can land."""
    gap = described["spacing_log_ratio"]
    print(f"bucket set {described['name']}: sides multiples of {described['step']}, largest log aspect-ratio gap "
          f"{gap:.3f} (an image is cropped at most {math.exp(gap / 2) - 1:.0%} off its aspect ratio)")


def _print_buckets(histogram: dict[str, int] | None) -> None:
    """The bucket histogram of a ``--buckets`` output, one ``HxW: rows`` entry per bucket used."""
    if histogram:
        print(f"buckets (HxW: rows): {', '.join(f'{k}: {v:,}' for k, v in histogram.items())}")


def _add_bucket_flip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--buckets", metavar="AREA|sdxl", default=None,
                   help="aspect-ratio buckets: N (area about NxN, e.g. 256 or 1024; sides multiples of "
                   "--bucket-step, aspect ratios 1:4 to 4:1) or sdxl (SDXL's 40 published sizes). Each image goes "
                   "to the bucket nearest its aspect ratio (log space), is resized to cover it and --crop center|"
                   "random cropped; rows record bucket [H, W]. Replaces --resolution")
    p.add_argument("--bucket-step", type=int, default=None,
                   help="side step of --buckets N, a multiple of the downsampling factor (default: about N/16 "
                   "rounded to a multiple of the factor: 16 at 256, 32 at 512, 64 at 1024 as SDXL)")
    p.add_argument("--hflip", choices=("none", "both"), default="none",
                   help="both: also store the latents of the horizontally mirrored image, in columns "
                   "mean_flip/logvar_flip (or latent_flip) of the same row")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``encode-dataset`` and ``latent-stats`` among the ``sdvae`` subcommands."""
    p = sub.add_parser(
        "encode-dataset", help="encode an image folder or dataset into a latent dataset (resumable, multi-process)",
        description="Encode every image of SRC into OUT, a `datasets` dataset (datasets.load_from_disk) or "
        "WebDataset tar shards, one row per readable image. Unreadable inputs are skipped and listed in "
        "OUT/skipped.txt. Killed and run again with the same arguments, it finishes without duplicates or "
        "re-encoding finished shards. Runs under `torchrun`/`accelerate launch` too (each process encodes its own "
        "shards), or on a Ray cluster (--engine ray). SRC and OUT may be fsspec URLs (s3://, gs://, hf://; "
        "credentials and endpoint from the environment, e.g. AWS_ENDPOINT_URL). " + INPUT_NOTES)
    p.add_argument("src", help="image folder (recursive), save_to_disk folder, WebDataset tar shards or parquet "
                   "shards (a file, {00000..00099}.tar, *.parquet or a .txt list; local or a URL; streamed, one "
                   "output shard per input shard; json/txt members carried), or hub dataset")
    p.add_argument("out", help="output folder or URL (s3://bucket/prefix)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--resolution", type=int, default=0,
                   help="resize the shorter side to N (bicubic, antialiased) before cropping; 0 (default): "
                   "keep each image's size")
    p.add_argument("--crop", choices=("center", "random", "none"), default=None,
                   help="center/random NxN crop, or none: keep the whole image (sides trimmed to multiples of "
                   "the downsampling factor). Default: center with --resolution, none without")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute and storage precision; auto (default): bf16 where the hardware computes it natively, "
                   "else fp32 (bf16 is stored as raw 16-bit patterns: Arrow has no bf16)")
    p.add_argument("--store", choices=("mean_logvar", "mean", "sample"), default="mean_logvar",
                   help="posterior mean + log-variance (default), the mean, or one seeded posterior sample")
    p.add_argument("--num-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="DataLoader workers decoding/resizing images (0: in the main process; default: "
                   "half the CPU cores, at most 8; not used with --engine ray: its actors decode in threads)")
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per output shard (the unit of resuming) "
                   "of a folder or dataset source; tar/parquet shards map one input shard to one output shard")
    p.add_argument("--streaming", action="store_true",
                   help="stream a datasets source (hub name or local folder of data files) shard by shard with "
                   "load_dataset(streaming=True): nothing downloaded or cached first; one output shard per dataset "
                   "shard (usually one per data file)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder (one graph per batch shape; the compile time is printed as a "
                   "note). Pays off on long runs at one --resolution, not with many buckets; on CPU it gains little")
    p.add_argument("--part-size", type=int, default=0, metavar="N",
                   help="tar/parquet shards: write each input shard's output in parts of N samples "
                   "(data/shard-00003-0002.arrow), so a kill loses at most a part of a large shard; 0 (default): "
                   "one output shard per input shard")
    p.add_argument("--format", choices=("arrow", "webdataset"), default="arrow",
                   help="arrow (default): a `datasets` folder of Arrow shards; webdataset: tar shards, one sample "
                   "per row (KEY.latents.safetensors + KEY.json). LatentDataset and LatentStream read both")
    p.add_argument("--engine", choices=("torchrun", "ray"), default="torchrun",
                   help="torchrun (default): this process, or each process of torchrun/accelerate launch, encodes "
                   "its own shards; ray: Ray Data on a running cluster (RAY_ADDRESS, `ray start --head`) or a local "
                   "instance (extra [ray])")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --engine ray: number of encoder actors, each holding the model (default: one per GPU "
                   "of the Ray cluster, or 1 without GPUs)")
    p.add_argument("--image-column", default="image", help="image column of a dataset source")
    p.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict folder")
    p.add_argument("--carry", default=None, help="comma-separated dataset columns to carry into OUT "
                   "(default: every non-image column; '' for none)")
    p.add_argument("--seed", type=int, default=0, help="seed of random crops and of --store sample")
    _add_bucket_flip_arguments(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode_dataset)

    p = sub.add_parser("latent-stats", help="exact per-channel/global latent mean and std; recommended scaling",
                       description="Stream over an encode-dataset output and print per-channel and global mean "
                       "and std (exact, float64) and the recommended scaling_factor (1/std) and shift_factor "
                       "(mean), as SD3/FLUX define them.")
    p.add_argument("dataset", help="an encode-dataset output folder")
    p.add_argument("--over", choices=("auto", "posterior", "mean"), default="auto",
                   help="posterior: z = mean + sigma*eps, exactly (default when log-variances are stored); "
                   "mean: the posterior means only")
    p.add_argument("--write-config", metavar="MODEL_FOLDER",
                   help="write scaling_factor/shift_factor into this diffusers folder's config.json (FLUX.2: "
                   "the patchified channel means/variances into the BatchNorm buffers of its weights)")
    p.add_argument("--per-channel", action="store_true",
                   help="with --write-config: write latents_mean/latents_std (and scaling_factor 1) instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_latent_stats)
