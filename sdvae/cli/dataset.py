"""``sdvae encode-dataset`` and ``sdvae latent-stats``, and ``decode --row`` of a latent dataset."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdvae.cli.options import INPUT_NOTES, MODEL_HELP, codec_from_args, default_model, preview_map
from sdvae.errors import UserError, require_extra
from sdvae.model.dtypes import DTYPE_CHOICES
from sdvae.model.presets import PRESETS


def decode_dataset_rows(args: argparse.Namespace) -> int:
    """``sdvae decode OUT --row N``: decode (and/or preview) rows of an encode-dataset output."""
    _require_data("sdvae decode --row")
    from sdvae.images.write import save_image, to_pil
    from sdvae.latents.dataset import LatentDataset
    from sdvae.latents.format import read_dataset_meta
    from sdvae.latents.preview import latent_preview
    from sdvae.model.info import config_dict, latent_space_hash

    meta = read_dataset_meta(args.latents)
    data = LatentDataset(args.latents, seed=args.seed, scaled=False, sample=args.sample, columns=[], flip="never")
    rows = args.row or [0]
    bad = [r for r in rows if not 0 <= r < len(data)]
    if bad:
        raise UserError(f"{args.latents}: no row {bad[0]} (the dataset has {len(data)} rows)")
    codec = None
    if not args.preview_only:
        if not args.model:
            args.model = meta["model"] if meta["model"] in PRESETS or Path(meta["model"]).exists() else None
        ref, codec = codec_from_args(args)
        # Unscaled latents depend on the architecture and weights, not on the scaling keys (which
        # `latent-stats --write-config` may have changed since), so those are left out of the check.
        if latent_space_hash(config_dict(codec.master)) != meta["arch_hash"]:
            raise UserError(f"{args.latents}: latents were made by {meta['model']} (config hash "
                            f"{meta['config_hash']}), whose architecture differs from {ref}'s; "
                            "pass the matching --model")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    rgb_map = preview_map(meta) if args.preview or args.preview_only else None
    for row in rows:
        z, _ = data.unscaled(row)
        stem = f"row-{row:06d}"
        if codec is not None:
            dest = out_dir / f"{stem}.png"
            save_image(to_pil(codec.decode(z[None])), dest)
            print(dest)
        if args.preview or args.preview_only:
            preview = latent_preview(z[None], upscale=meta["downsampling_factor"], rgb_map=rgb_map)
            dest = out_dir / f"{stem}.preview.png"
            save_image(to_pil(preview * 2 - 1), dest)
            print(dest)
    return 0


def _require_data(what: str) -> None:
    require_extra("datasets", what)
    require_extra("pyarrow", what)


def cmd_encode_dataset(args: argparse.Namespace) -> int:
    _require_data("sdvae encode-dataset")
    from sdvae.latents.export import EncodeOptions, run_encode

    carry = None if args.carry is None else tuple(c.strip() for c in args.carry.split(",") if c.strip())
    opts = EncodeOptions(
        src=args.src, out=args.out, model=args.model or default_model(), resolution=args.resolution, crop=args.crop,
        batch_size=args.batch_size, dtype=args.dtype, store=args.store, num_workers=args.num_workers,
        shard_size=args.shard_size, image_column=args.image_column, split=args.split, carry=carry, seed=args.seed,
        device=args.device, progress=not args.no_progress, **_bucket_flip_options(args))
    summary = run_encode(opts)
    if args.json:
        print(json.dumps(summary))
        return 0
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    who = f"rank {summary['rank']}/{summary['world_size']}: " if summary["world_size"] > 1 else ""
    print(f"{who}encoded {summary['encoded']:,} image(s) ({summary['unreadable']} unreadable) in "
          f"{summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s; "
          f"{summary['shards_encoded']} shard(s) written, {summary['shards_done_before']} already done")
    if summary["complete"]:
        _print_buckets(summary.get("buckets"))
        skipped = Path(args.out) / "skipped.txt"
        print(f"complete: {summary['rows']:,} rows in {args.out}"
              + (f"; {summary['skipped']} unreadable input(s) listed in {skipped}" if summary["skipped"] else ""))
    else:
        print(f"{summary['shards_missing']} shard(s) still missing (other processes are on them, or were stopped: "
              "run the same command again to finish)")
    return 0


def cmd_latent_stats(args: argparse.Namespace) -> int:
    _require_data("sdvae latent-stats")
    from sdvae.latents.format import read_dataset_meta
    from sdvae.latents.stats import compute_latent_stats, write_scaling_config

    stats = compute_latent_stats(args.dataset, over=args.over)
    written = None
    if args.write_config:
        written = write_scaling_config(args.write_config, stats, per_channel=args.per_channel)
    if args.json:
        result = stats.to_dict()
        if written:
            result["written"] = {"config": str(written[0]), **written[1]}
        print(json.dumps(result))
        return 0
    what = {"posterior": "posterior (means + exp(logvar))", "mean": "posterior means", "sample": "stored samples"}
    print(f"{args.dataset}: {stats.rows:,} rows, {len(stats.channel_mean)} channels x "
          f"{stats.values_per_channel:,} values, over the {what[stats.over]}")
    print(f"{'channel':>8} {'mean':>12} {'std':>12}")
    for c, (m, sd) in enumerate(zip(stats.channel_mean, stats.channel_std, strict=True)):
        print(f"{c:>8} {m:>12.6f} {sd:>12.6f}")
    print(f"{'all':>8} {stats.mean:>12.6f} {stats.std:>12.6f}")
    print(f"recommended: scaling_factor = 1/std = {stats.scaling_factor:.6f}, shift_factor = mean = "
          f"{stats.shift_factor:.6f}")
    used = read_dataset_meta(args.dataset)["scaling"]
    print(f"in force at encode time: scaling_factor {used['scaling_factor']}, shift_factor {used['shift_factor']}"
          + (", latents_mean/latents_std set" if used.get("latents_mean") is not None else ""))
    if written:
        print(f"wrote {', '.join(written[1])} to {written[0]}")
    _print_buckets(stats.buckets)
    return 0


def _bucket_flip_options(args: argparse.Namespace) -> dict:
    return {"buckets": args.buckets, "bucket_step": args.bucket_step, "hflip": args.hflip}


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
    p.add_argument("--bucket-step", type=int, default=64,
                   help="side step of --buckets N, a multiple of the downsampling factor (default 64)")
    p.add_argument("--hflip", choices=("none", "both"), default="none",
                   help="both: also store the latents of the horizontally mirrored image, in columns "
                   "mean_flip/logvar_flip (or latent_flip) of the same row")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``encode-dataset`` and ``latent-stats`` among the ``sdvae`` subcommands."""
    p = sub.add_parser(
        "encode-dataset", help="encode an image folder or dataset into a latent dataset (resumable, multi-process)",
        description="Encode every image of SRC into OUT, a `datasets` dataset on disk (datasets.load_from_disk), "
        "one row per readable image. Unreadable files are skipped and listed in OUT/skipped.txt. Killed and run "
        "again with the same arguments, it finishes without duplicates or re-encoding finished shards. Runs "
        "under `torchrun`/`accelerate launch` too: each process encodes its own shards. " + INPUT_NOTES)
    p.add_argument("src", help="image folder (recursive), save_to_disk folder, .parquet file/glob, or hub dataset")
    p.add_argument("out", help="output folder")
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
                   "half the CPU cores, at most 8)")
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per output shard (the unit of resuming)")
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
                   help="write scaling_factor/shift_factor into this diffusers folder's config.json")
    p.add_argument("--per-channel", action="store_true",
                   help="with --write-config: write latents_mean/latents_std (and scaling_factor 1) instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_latent_stats)
