"""``sdvae eval``: a model-card reconstruction row for any model and image collection."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdvae.cli.options import add_runtime_args, codec_from_args, note
from sdvae.errors import UserError, require_extra


def cmd_eval(args: argparse.Namespace) -> int:
    from sdvae.eval.engine import EvalSettings, evaluate_source
    from sdvae.eval.report import markdown_table, report_json, summary_lines, write_report
    from sdvae.images.sources import open_source

    if not args.no_lpips:
        require_extra("lpips", "LPIPS in sdvae eval (or pass --no-lpips)")
        require_extra("torchvision", "LPIPS in sdvae eval (or pass --no-lpips)")
    if not args.no_fid:
        require_extra("torch_fidelity", "rFID in sdvae eval (or pass --no-fid)")
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
        fid=not args.no_fid, inception_weights=args.inception_weights or "", workers=args.workers,
        diffusability=args.diffusability)
    settings.check()
    if args.json_out and Path(args.json_out).is_dir():
        raise UserError(f"--json-out {args.json_out}: is a folder; give a file name")
    source = open_source(args.data, image_column=args.image_column, split=args.split,
                         options={"split": "--split", "image_column": "--image-column"})
    ref, codec = codec_from_args(args)
    report = evaluate_source(codec, source, settings, model_ref=ref)
    if args.json_out:
        note(f"wrote {write_report(report, args.json_out)}")
    if args.json:
        print(report_json(report))
        return 0
    print("\n".join(summary_lines(report)))
    if args.markdown:
        print()
        print(markdown_table(report))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` among the ``sdvae`` subcommands."""
    p = sub.add_parser(
        "eval", help="model-card reconstruction table: PSNR, SSIM, LPIPS, rFID, ELBO bits/dim",
        description="Evaluate a VAE on an image collection under a stated protocol: PSNR and SSIM (mean ± std), "
        "LPIPS and rFID when their network weights are on disk (never downloaded; otherwise reported unavailable), "
        "and the ELBO / importance-weighted bound in bits/dim under an 8-bit discretized Gaussian decoder "
        "likelihood with prior N(0, I) on the unscaled latents. The default protocol is the sd-vae-ft-mse model "
        "card's: shorter side resized to 256, center crop 256x256 (COCO-2017 val, 5,000 images). Unreadable "
        "images are skipped and counted. Images are read to the model's image channels (1 grayscale: colour by "
        "luminance; 3 RGB; 4 RGBA, alpha kept): PSNR, SSIM and the bounds cover all of them (alpha included), "
        "while LPIPS and rFID, RGB networks, see the RGB view (grayscale repeated to three channels, RGBA "
        "without alpha).")
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
    p.add_argument("--diffusability", action="store_true",
                   help="also measure how learnable the latents are for diffusion: the upper-half-band share of "
                   "the scaled latents' power spectrum vs the image's at the latent grid, the equivariance gap "
                   "(PSNR of decode(τ(encode(x))) vs decode(encode(τ(x))) against τ(x) for ×1/2 and ×3/4 scale, "
                   "90° rotation and horizontal flip) and per-channel statistics (mean, std, correlation, "
                   "kurtosis); definitions in the JSON protocol. Costs about 3 encodes and 6 decodes more per "
                   "image (use --limit or a smaller --resolution to bound it)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2; 0: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object (every figure and the exact protocol) "
                   "instead of the table")
    p.add_argument("--json-out", metavar="FILE", help="also write that JSON object to FILE")
    p.add_argument("--markdown", action="store_true", help="also print a model-card style markdown table row")
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)
