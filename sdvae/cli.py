"""The ``sdvae`` command line: roundtrip, encode, decode, convert, info, sample, interpolate (here) and
encode-dataset, latent-stats, eval (:mod:`sdvae.cli_datasets`).

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

from sdvae.cli_args import (
    EMBEDDED,
    INPUT_NOTES,
    MODEL_HELP,
    add_runtime_args,
    codec_from_args,
    default_model,
    default_output,
    load_checked,
)
from sdvae.cli_datasets import cmd_encode_dataset, cmd_eval, cmd_latent_stats
from sdvae.errors import UserError
from sdvae.model import DTYPES, PRESETS

__all__ = ["EMBEDDED", "build_parser", "default_model", "main"]

EXIT_USER_ERROR = 2
LATENTS_FORMAT = "sdvae-latents/1"

def cmd_roundtrip(args: argparse.Namespace) -> int:
    import torch

    from sdvae.figures import save_image, side_by_side, to_pil
    from sdvae.metrics import psnr, quantize, ssim

    src = Path(args.image)
    ref, codec = codec_from_args(args)
    img = load_checked(args.image, codec.factor, args.tile)
    out = Path(args.output) if args.output else default_output(src, "recon")
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

    ref, codec = codec_from_args(args)
    tensors, entries = {}, []
    for i, path in enumerate(args.images):
        img = load_checked(path, codec.factor, args.tile)
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
        from sdvae.cli_datasets import decode_dataset_rows

        return decode_dataset_rows(args)
    if args.row or args.preview:
        raise UserError(f"{args.latents}: --row/--preview apply to an encode-dataset folder, not a latents file")
    tensors, meta = read_latents_file(args.latents)
    if meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{args.latents}: not an sdvae latents file (made by `sdvae encode`)")
    if not args.model:
        args.model = meta["model"] if meta["model"] in PRESETS or Path(meta["model"]).exists() else None
    ref, codec = codec_from_args(args)
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


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    from sdvae.explore import sample_images
    from sdvae.figures import check_output_path, image_grid, save_image

    check_output_path(args.output)
    if args.nrow is not None and args.nrow < 1:
        raise UserError(f"--nrow must be at least 1, got {args.nrow}")
    ref, codec = codec_from_args(args)
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
    ref, codec = codec_from_args(args)
    img_a = load_checked(args.image_a, codec.factor, args.tile)
    img_b = load_checked(args.image_b, codec.factor, args.tile)
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
    add_runtime_args(p)
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("encode", help="encode images to a latents .safetensors file",
                       description="Store each image's posterior mean and log-variance (unscaled) with the "
                       "model's config hash and the original sizes. " + INPUT_NOTES)
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    add_runtime_args(p)
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
    add_runtime_args(p)
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
    add_runtime_args(p)
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
    add_runtime_args(p)
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
    add_runtime_args(p)
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
