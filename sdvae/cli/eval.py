"""``sdvae eval``: a model-card reconstruction row for any model and image collection."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdvae.cli.options import codec_from_args
from sdvae.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    from sdvae.eval.engine import EvalSettings, evaluate_source
    from sdvae.eval.report import markdown_table, report_json, summary_lines, write_report
    from sdvae.images.sources import open_source

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
    source = open_source(args.data, image_column=args.image_column, split=args.split,
                         options={"split": "--split", "image_column": "--image-column"})
    ref, codec = codec_from_args(args)
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
