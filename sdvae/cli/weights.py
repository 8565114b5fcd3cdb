"""``sdvae convert`` and ``sdvae info``: weight files and what they hold."""

from __future__ import annotations

import argparse
import json


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
