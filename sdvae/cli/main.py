"""The ``sdvae`` command line: the parser of every subcommand and the entry point.

Every command turns bad input into one line on stderr and exit code 2 (see
:class:`sdvae.errors.UserError`); heavy imports happen inside the commands so ``sdvae --help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdvae.cli.dataset import cmd_encode_dataset, cmd_latent_stats
from sdvae.cli.eval import cmd_eval
from sdvae.cli.generate import cmd_interpolate, cmd_sample
from sdvae.cli.latents_file import cmd_decode, cmd_encode
from sdvae.cli.options import (
    EMBEDDED,
    INPUT_NOTES,
    MODEL_HELP,
    add_runtime_args,
    default_model,
)
from sdvae.cli.roundtrip import cmd_roundtrip
from sdvae.cli.weights import cmd_convert, cmd_info
from sdvae.errors import UserError
from sdvae.model.dtypes import DTYPES

__all__ = ["EMBEDDED", "build_parser", "default_model", "main"]

EXIT_USER_ERROR = 2


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
