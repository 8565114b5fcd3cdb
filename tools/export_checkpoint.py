#!/usr/bin/env python
"""Export a training checkpoint's weights as a diffusers folder (e.g. to ship a run that is still going).

    python tools/export_checkpoint.py runs/tiny-f8c4 checkpoints/sdvae-tiny-f8c4 [--raw] [--force]

Takes the newest complete checkpoint of the run, its EMA weights unless --raw, and the architecture
from the run's resolved config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from sdvae.errors import UserError
from sdvae.model.load import load_vae
from sdvae.model.save import save_diffusers
from sdvae.train.checkpoint import latest_checkpoint
from sdvae.train.config import load_config
from sdvae.train.ema import EMA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (train.out)")
    parser.add_argument("output", help="diffusers folder to write")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        run = Path(args.run)
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UserError(f"{run}: no complete checkpoint found")
        cfg = load_config(run / "config.yaml")
        vae = load_vae(cfg.model.init, norm_num_groups=cfg.model.norm_num_groups,
                       layers_per_block=cfg.model.layers_per_block)
        vae.load_state_dict(load_file(ckpt / "vae.safetensors"))
        if not args.raw and (ckpt / "ema.safetensors").is_file():
            ema = EMA(vae, cfg.train.ema_decay)
            ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
            ema.copy_to(vae)
        save_diffusers(vae, args.output, overwrite=args.force)
    except UserError as err:
        print(f"export_checkpoint.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{ckpt.name} ({'raw' if args.raw else 'EMA'} weights) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
