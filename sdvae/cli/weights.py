"""``sdvae convert`` and ``sdvae info``: weight files and what they hold."""

from __future__ import annotations

import argparse
import json

from sdvae.cli.options import MODEL_HELP
from sdvae.model.dtypes import DTYPES


def cmd_convert(args: argparse.Namespace) -> int:
    from sdvae.model.convert import convert

    out = convert(args.ref, args.output, to=args.to, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {args.to} weights ({args.dtype}) to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sdvae.model.info import describe
    from sdvae.model.load import load_vae

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and ``info`` among the ``sdvae`` subcommands."""
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
