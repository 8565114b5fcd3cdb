"""``sdvae roundtrip``: encode and decode one image, write it and a comparison, print PSNR/SSIM."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdvae.cli.options import INPUT_NOTES, add_runtime_args, codec_from_args, default_output, load_checked, note
from sdvae.heap import bounded_memory

if TYPE_CHECKING:
    from sdvae.codec.codec import Codec


def cmd_roundtrip(args: argparse.Namespace) -> int:
    src = Path(args.image)
    ref, codec = codec_from_args(args)
    img = load_checked(args.image, codec.factor, args.tile, codec.channels)
    # An image big enough to tile is where memory matters: the whole command then keeps glibc's allocation
    # (sdvae/heap.py), the metrics and PNGs of a 4096² image included.
    padded = [-(-side // codec.factor) * codec.factor for side in img.tensor.shape[-2:]]
    with bounded_memory() if codec.tiles(*padded) else contextlib.nullcontext():
        return _roundtrip(args, src, ref, codec, img)


def _roundtrip(args: argparse.Namespace, src: Path, ref: str, codec: Codec, img: Any) -> int:
    import torch

    from sdvae.images.compose import side_by_side
    from sdvae.images.write import save_image, to_pil
    from sdvae.metrics.pixel import psnr, quantize, ssim

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
        "dtype": codec.dtype_name,
        "device": str(codec.device),
        "notes": img.notes + codec.notes,
    }
    rec_pil = to_pil(recon)
    save_image(rec_pil, out, protect=[src])
    save_image(side_by_side(to_pil(img.tensor), rec_pil), compare, protect=[src])
    if args.json:
        print(json.dumps(result))
    else:
        for message in result["notes"]:
            note(message)
        c, h, w = result["latent_shape"]
        print(f"{src.name}: {img.size[0]}x{img.size[1]} -> latent {c}x{h}x{w} -> {out}")
        print(f"PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  {seconds:.2f} s  (comparison: {compare})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``roundtrip`` among the ``sdvae`` subcommands."""
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
