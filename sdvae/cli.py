"""The ``sdvae`` command line: roundtrip, encode, decode, convert, info.

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

    p = sub.add_parser("decode", help="decode a latents file written by `sdvae encode` to images")
    p.add_argument("latents")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_decode)

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
