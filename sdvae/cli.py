"""The ``sdvae`` command line: roundtrip, encode, decode, encode-dataset, latent-stats, convert, info.

Every command turns bad input into one line on stderr and a non-zero exit code (see
:class:`sdvae.errors.UserError`); heavy imports happen inside the commands so ``sdvae --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sdvae.errors import UserError
from sdvae.model import DTYPES, PRESETS

EXIT_USER_ERROR = 2
EMBEDDED = Path(__file__).resolve().parent.parent / "checkpoints" / "sdvae-tiny-f8c4"
LATENTS_FORMAT = "sdvae-latents/1"

MODEL_HELP = (
    "model: a preset (" + ", ".join(PRESETS) + "), a diffusers folder, a single-file LDM/A1111 checkpoint "
    "(.safetensors/.ckpt/.pt/.pth), or a Hugging Face Hub id. Default: the embedded checkpoint "
    f"({EMBEDDED.name}) when present."
)
INPUT_NOTES = (
    "Inputs: any format Pillow reads. Alpha is composited on white; grayscale, palette, CMYK and 16-bit "
    "images are converted to 8-bit-range RGB; EXIF rotation is applied. Sides that are not multiples of "
    "the downsampling factor are reflect-padded, then cropped back."
)


def default_model() -> str:
    """The embedded checkpoint's path, or a UserError saying --model is needed."""
    if (EMBEDDED / "config.json").is_file():
        return str(EMBEDDED)
    raise UserError(f"no embedded checkpoint at {EMBEDDED}; pass --model REF (e.g. --model tiny, a folder or a file)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--tile", choices=("auto", "on", "off"), default="auto",
                   help="exact tiled encode/decode with bounded memory (auto: on for large images)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="compute precision (fp16/bf16 fall back to fp32 on non-finite output)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _codec(args: argparse.Namespace):
    import torch

    from sdvae.codec import Codec
    from sdvae.model import load_vae

    ref = args.model or default_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return ref, Codec(load_vae(ref), device=device, dtype=args.dtype, tile=args.tile)


def _load_checked(path: str, factor: int, tile: str):
    from sdvae.images import check_min_size, load_image

    img = load_image(path, allow_huge=(tile == "on"))
    check_min_size(img.size, factor, path)
    return img


def _default_output(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}.{suffix}.png")


def cmd_roundtrip(args: argparse.Namespace) -> int:
    import torch

    from sdvae.figures import save_image, side_by_side, to_pil
    from sdvae.metrics import psnr, quantize, ssim

    src = Path(args.image)
    ref, codec = _codec(args)
    img = _load_checked(args.image, codec.factor, args.tile)
    out = Path(args.output) if args.output else _default_output(src, "recon")
    compare = out.with_name(f"{out.stem}.compare.png")
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    recon, enc = codec.roundtrip(img.tensor, sample=args.sample, generator=generator)
    seconds = time.perf_counter() - start

    original, rec = quantize(img.tensor), quantize(recon)
    result: dict[str, Any] = {
        "input": str(src),
        "model": ref,
        "psnr": round(float(psnr(original, rec)[0]), 4),
        "ssim": round(float(ssim(original, rec)[0]), 6),
        "latent_shape": list(enc.mean.shape[1:]),
        "image_size": [img.size[0], img.size[1]],
        "output": str(out),
        "comparison": str(compare),
        "seconds": round(seconds, 3),
        "sampled": bool(args.sample),
        "notes": img.notes + codec.notes,
    }
    rec_pil = to_pil(recon)
    save_image(rec_pil, out, protect=[src])
    save_image(side_by_side(to_pil(img.tensor), rec_pil), compare, protect=[src])
    if args.json:
        print(json.dumps(result))
    else:
        for note in result["notes"]:
            print(f"note: {note}")
        c, h, w = result["latent_shape"]
        print(f"{src.name}: {img.size[0]}x{img.size[1]} -> latent {c}x{h}x{w} -> {out}")
        print(f"PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  {seconds:.2f} s  (comparison: {compare})")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from sdvae.latents import write_latents_file
    from sdvae.model import config_dict, config_hash

    ref, codec = _codec(args)
    tensors, entries = {}, []
    for i, path in enumerate(args.images):
        img = _load_checked(path, codec.factor, args.tile)
        enc = codec.encode(img.tensor)
        key = f"{i:05d}"
        tensors[f"{key}.mean"] = enc.mean[0].contiguous()
        tensors[f"{key}.logvar"] = enc.logvar[0].contiguous()
        entries.append({"key": key, "path": str(path), "size": list(img.size), "notes": img.notes})
    meta = {
        "format": LATENTS_FORMAT,
        "model": ref,
        "config_hash": config_hash(codec.master),
        "config": config_dict(codec.master),
        "scaled": False,
        "images": entries,
    }
    write_latents_file(tensors, meta, args.output)
    for note in codec.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(entries)} latent(s) to {args.output}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from sdvae.codec import Encoded
    from sdvae.figures import save_image, to_pil
    from sdvae.latents import read_latents_file
    from sdvae.model import config_hash

    if Path(args.latents).is_dir():
        return _decode_dataset_rows(args)
    if args.row or args.preview:
        raise UserError(f"{args.latents}: --row/--preview apply to an encode-dataset folder, not a latents file")
    tensors, meta = read_latents_file(args.latents)
    if meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{args.latents}: not an sdvae latents file (made by `sdvae encode`)")
    if not args.model:
        args.model = meta["model"] if meta["model"] in PRESETS or Path(meta["model"]).exists() else None
    ref, codec = _codec(args)
    if config_hash(codec.master) != meta["config_hash"]:
        raise UserError(f"{args.latents}: latents were made by a model with config hash {meta['config_hash']}, "
                        f"but {ref} has {config_hash(codec.master)}; pass the matching --model")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    for entry in meta["images"]:
        key = entry["key"]
        width, height = entry["size"]
        enc = Encoded(tensors[f"{key}.mean"][None], tensors[f"{key}.logvar"][None], (height, width))
        images = codec.decode(enc.latents(args.sample, generator), enc.size)
        dest = out_dir / f"{Path(entry['path']).stem}.{key}.png"
        save_image(to_pil(images), dest, protect=[Path(entry["path"])])
        print(dest)
    return 0


def _decode_dataset_rows(args: argparse.Namespace) -> int:
    """``sdvae decode OUT --row N``: decode (and/or preview) rows of an encode-dataset output."""
    from sdvae.encode_dataset import latent_space_hash
    from sdvae.figures import save_image, to_pil
    from sdvae.latents import LatentDataset, latent_preview, read_dataset_meta, scale_latents
    from sdvae.model import config_dict

    meta = read_dataset_meta(args.latents)
    data = LatentDataset(args.latents, seed=args.seed, scaled=False, sample=args.sample, columns=[])
    rows = args.row or [0]
    bad = [r for r in rows if not 0 <= r < len(data)]
    if bad:
        raise UserError(f"{args.latents}: no row {bad[0]} (the dataset has {len(data)} rows)")
    codec = None
    if not args.preview_only:
        if not args.model:
            args.model = meta["model"] if meta["model"] in PRESETS or Path(meta["model"]).exists() else None
        ref, codec = _codec(args)
        # Unscaled latents depend on the architecture and weights, not on the scaling keys (which
        # `latent-stats --write-config` may have changed since), so those are left out of the check.
        if latent_space_hash(config_dict(codec.master)) != meta["arch_hash"]:
            raise UserError(f"{args.latents}: latents were made by {meta['model']} (config hash "
                            f"{meta['config_hash']}), whose architecture differs from {ref}'s; "
                            "pass the matching --model")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        z, _ = data.unscaled(row)
        stem = f"row-{row:06d}"
        if codec is not None:
            dest = out_dir / f"{stem}.png"
            save_image(to_pil(codec.decode(z[None])), dest)
            print(dest)
        if args.preview or args.preview_only:
            preview = latent_preview(scale_latents(z[None], meta["scaling"]), upscale=meta["downsampling_factor"])
            dest = out_dir / f"{stem}.preview.png"
            save_image(to_pil(preview * 2 - 1), dest)
            print(dest)
    return 0


def cmd_encode_dataset(args: argparse.Namespace) -> int:
    from sdvae.encode_dataset import EncodeOptions, run_encode

    carry = None if args.carry is None else tuple(c.strip() for c in args.carry.split(",") if c.strip())
    opts = EncodeOptions(
        src=args.src, out=args.out, model=args.model or default_model(), resolution=args.resolution, crop=args.crop,
        batch_size=args.batch_size, dtype=args.dtype, store=args.store, num_workers=args.num_workers,
        shard_size=args.shard_size, image_column=args.image_column, split=args.split, carry=carry, seed=args.seed,
        device=args.device, progress=not args.no_progress)
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
        skipped = Path(args.out) / "skipped.txt"
        print(f"complete: {summary['rows']:,} rows in {args.out}"
              + (f"; {summary['skipped']} unreadable input(s) listed in {skipped}" if summary["skipped"] else ""))
    else:
        print(f"{summary['shards_missing']} shard(s) still missing (other processes are on them, or were stopped: "
              "run the same command again to finish)")
    return 0


def cmd_latent_stats(args: argparse.Namespace) -> int:
    from sdvae.latent_stats import compute_latent_stats, write_scaling_config
    from sdvae.latents import read_dataset_meta

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
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sdvae.convert import convert

    out = convert(args.ref, args.output, to=args.to, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {args.to} weights ({args.dtype}) to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sdvae.model import describe, load_vae

    facts = describe(load_vae(args.ref))
    if args.json:
        print(json.dumps(facts))
        return 0
    params = facts.pop("parameters")
    print(f"model: {args.ref}")
    for key, value in facts.items():
        print(f"  {key}: {value}")
    print(f"  parameters: {params['total']:,} (encoder {params['encoder']:,}, decoder {params['decoder']:,})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sdvae.evaluate import EvalSettings, evaluate_source, markdown_table, report_json, summary_lines, write_report
    from sdvae.sources import open_source

    if args.sigma == "auto":
        sigma = None
    else:
        try:
            sigma = float(args.sigma)
        except ValueError:
            raise UserError(f"--sigma must be 'auto' or a number (e.g. 0.05), got {args.sigma!r}") from None
    settings = EvalSettings(
        resolution=None if args.full else args.resolution, center_crop=args.center_crop,
        batch_size=args.batch_size, limit=args.limit, iw_samples=args.iw, sigma=sigma, seed=args.seed,
        lpips=not args.no_lpips, lpips_net=args.lpips_net, lpips_weights=args.lpips_weights or "",
        fid=not args.no_fid, inception_weights=args.inception_weights or "", workers=args.workers)
    settings.check()
    if args.json and args.json != "-" and Path(args.json).is_dir():
        raise UserError(f"--json {args.json}: is a folder; give a file name")
    try:
        source = open_source(args.data, image_column=args.image_column, split=args.split)
    except UserError as err:  # open_source's hints name the training config keys
        raise UserError(str(err).replace("set data.split", "pass --split")
                        .replace("set data.image_column", "pass --image-column")) from None
    ref, codec = _codec(args)
    report = evaluate_source(codec, source, settings, model_ref=ref)
    if args.json == "-":
        print(report_json(report))
        return 0
    print("\n".join(summary_lines(report)))
    if args.markdown:
        print()
        print(markdown_table(report))
    if args.json:
        print(f"wrote {write_report(report, args.json)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    from sdvae.explore import sample_images
    from sdvae.figures import check_output_path, image_grid, save_image

    check_output_path(args.output)
    if args.nrow is not None and args.nrow < 1:
        raise UserError(f"--nrow must be at least 1, got {args.nrow}")
    ref, codec = _codec(args)
    images = sample_images(codec, args.n, (args.size, args.size), temperature=args.temperature, seed=args.seed,
                           space=args.space, batch_size=args.batch_size)
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    out = save_image(image_grid(images, nrow), args.output)
    for note in codec.notes:
        print(f"note: {note}")
    print(f"wrote {args.n} samples of {ref} ({args.size}x{args.size}, z ~ N(0, {args.temperature:g}²I) in the "
          f"{args.space} latent space, seed {args.seed}) to {out}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from sdvae.explore import fit_to, interpolate_images
    from sdvae.figures import check_output_path, labelled_rows, save_image

    inputs = [Path(args.image_a), Path(args.image_b)]
    check_output_path(args.output, protect=inputs)
    if args.n < 2:
        raise UserError(f"-n must be at least 2 (the two endpoints), got {args.n}")
    ref, codec = _codec(args)
    img_a = _load_checked(args.image_a, codec.factor, args.tile)
    img_b = _load_checked(args.image_b, codec.factor, args.tile)
    notes = [f"{inputs[0].name}: {n}" for n in img_a.notes] + [f"{inputs[1].name}: {n}" for n in img_b.notes]
    tensor_b = img_b.tensor
    if img_b.size != img_a.size:
        tensor_b = fit_to(tensor_b, (img_a.size[1], img_a.size[0]))
        notes.append(f"{inputs[1].name} resized from {img_b.size[0]}x{img_b.size[1]} to cover "
                     f"{img_a.size[0]}x{img_a.size[1]} (the size of {inputs[0].name}) and center-cropped")
    paths = interpolate_images(codec, img_a.tensor, tensor_b, args.n, batch_size=args.batch_size)
    strip = labelled_rows([("linear", paths["linear"]), ("spherical", paths["spherical"])])
    out = save_image(strip, args.output, protect=inputs)
    for note in notes + codec.notes:
        print(f"note: {note}")
    print(f"wrote {args.n} linear and {args.n} spherical steps from {inputs[0].name} to {inputs[1].name} "
          f"({ref}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every ``sdvae`` subcommand."""
    parser = argparse.ArgumentParser(prog="sdvae", description="Stable-Diffusion-style KL image VAEs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("roundtrip", help="encode and decode one image; print PSNR/SSIM",
                       description="Encode and decode IMAGE, write the reconstruction (same size as the input) "
                       "and a side-by-side comparison, print PSNR/SSIM. " + INPUT_NOTES)
    p.add_argument("image")
    p.add_argument("-o", "--output", help="reconstruction path (default: IMAGE's folder, NAME.recon.png); "
                   "the comparison goes beside it as NAME.compare.png")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("encode", help="encode images to a latents .safetensors file",
                       description="Store each image's posterior mean and log-variance (unscaled) with the "
                       "model's config hash and the original sizes. " + INPUT_NOTES)
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a latents file (`sdvae encode`) or rows of an encode-dataset output",
                       description="Decode every latent of a latents .safetensors file, or --row N of an "
                       "encode-dataset output folder (written as OUTPUT/row-N.png; --preview adds "
                       "row-N.preview.png, a fixed linear map of the latent channels to RGB).")
    p.add_argument("latents", help="a .safetensors file from `sdvae encode`, or an encode-dataset output folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row", type=int, action="append", help="dataset row to decode (repeatable; default 0)")
    p.add_argument("--preview", action="store_true", help="also write a decoder-free latent preview per row")
    p.add_argument("--preview-only", action="store_true", help="write only the previews (no model needed)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_decode)

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
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="compute and storage precision (bf16 is stored as raw 16-bit patterns: Arrow has no bf16)")
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

    p = sub.add_parser("convert", help="convert weights between diffusers and original LDM formats")
    p.add_argument("ref", help=MODEL_HELP.split(". Default")[0])
    p.add_argument("output")
    p.add_argument("--to", choices=("diffusers", "ldm"), required=True)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="architecture, parameter counts, latent shape, scaling")
    p.add_argument("ref", help=MODEL_HELP.split(". Default")[0])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "eval", help="model-card reconstruction table: PSNR, SSIM, LPIPS, rFID, ELBO bits/dim",
        description="Evaluate a VAE on an image collection under a stated protocol: PSNR and SSIM (mean ± std), "
        "LPIPS and rFID when their network weights are on disk (never downloaded; otherwise reported unavailable), "
        "and the ELBO / importance-weighted bound in bits/dim under an 8-bit discretized Gaussian decoder "
        "likelihood with prior N(0, I) on the unscaled latents. The default protocol is the sd-vae-ft-mse model "
        "card's: shorter side resized to 256, center crop 256x256 (COCO-2017 val, 5,000 images). Unreadable "
        "images are skipped and counted.")
    p.add_argument("data", help="an image folder (recursive), a save_to_disk folder, parquet file(s), or a Hugging "
                   "Face datasets name")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--resolution", type=int, default=256, help="resize the shorter side to this (default 256)")
    size.add_argument("--full", action="store_true", help="evaluate at each image's own size (no resize or crop)")
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the central RESOLUTION² square after resizing (default: on, the model-card protocol)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--split", default="validation", help="dataset split for datasets sources (default validation)")
    p.add_argument("--image-column", default="image", help="image column for datasets sources (default image)")
    p.add_argument("--iw", type=int, default=1, metavar="K",
                   help="posterior samples per image for the ELBO and the importance-weighted bound (default 1)")
    p.add_argument("--sigma", default="auto", help="decoder likelihood scale on the [-1,1] scale, or 'auto': the "
                   "best of 24 log-spaced values from 1/255 to 0.5, fitted on these images (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (default 0)")
    p.add_argument("--lpips-net", choices=("vgg", "alex", "squeeze"), default="vgg",
                   help="LPIPS backbone (default vgg)")
    p.add_argument("--lpips-weights", help="torchvision backbone weights file (default: the torch hub cache)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights (weights-inception-2015-12-05-"
                   "6726825d.pth; default: the torch hub cache)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2; 0: none)")
    p.add_argument("--json", metavar="FILE", help="write every figure and the exact protocol as JSON ('-': stdout)")
    p.add_argument("--markdown", action="store_true", help="also print a model-card style markdown table row")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sample", help="decode prior samples z ~ N(0, I) into a grid image",
        description="Draw z ~ N(0, T²I) in the scaled (diffusion) latent space, map it to the VAE's latents with the "
        "model's scaling (unscale), decode, and save a grid. This shows what the decoder makes of latents of the "
        "data's scale; it is not an image generator (that is the diffusion model's job).")
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("-o", "--output", required=True, help="grid image path (.png, .jpg, .webp...)")
    p.add_argument("--size", type=int, default=256, help="side of each sample in pixels, a multiple of the "
                   "downsampling factor (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="standard deviation of the draw (default 1)")
    p.add_argument("--space", choices=("scaled", "vae"), default="scaled",
                   help="scaled: N(0, I) in the diffusion space, then unscaled (default); vae: N(0, I) on the VAE's "
                   "own latents, the prior of its KL term")
    p.add_argument("--seed", type=int, default=0, help="seed (sample i is the same for any -n)")
    p.add_argument("--nrow", type=int, default=None, help="samples per row (default ceil(sqrt(n)))")
    p.add_argument("--batch-size", type=int, default=8, help="latents decoded per model call (default 8)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "interpolate", help="decode linear and spherical paths between two images' posterior means",
        description="Encode A and B, interpolate between their posterior means linearly and spherically (slerp over "
        "the flattened scaled latent), decode, and save one image with a 'linear' and a 'spherical' row; the "
        "endpoints are the reconstructions of A and B. B is resized and center-cropped to A's size if they differ. "
        + INPUT_NOTES)
    p.add_argument("image_a", metavar="A")
    p.add_argument("image_b", metavar="B")
    p.add_argument("-n", type=int, default=8, help="points per path, endpoints included (default 8)")
    p.add_argument("-o", "--output", required=True, help="strip image path (.png, .jpg, .webp...)")
    p.add_argument("--batch-size", type=int, default=8, help="latents decoded per model call (default 8)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_interpolate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdvae`` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as err:
        print(f"sdvae: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sdvae: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    # diffusers logs hub chatter at warning level; our own messages are what the user needs.
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
