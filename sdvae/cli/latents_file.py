"""``sdvae encode`` / ``sdvae decode``: images to a latents file and back, or rows of a latent dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdvae.cli.options import INPUT_NOTES, add_runtime_args, codec_from_args, load_checked
from sdvae.errors import UserError
from sdvae.latents.file import LATENTS_FORMAT
from sdvae.model.presets import PRESETS


def cmd_encode(args: argparse.Namespace) -> int:
    from sdvae.latents.file import write_latents_file
    from sdvae.model.info import config_dict, config_hash

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

    from sdvae.codec.codec import Encoded
    from sdvae.images.write import save_image, to_pil
    from sdvae.latents.file import read_latents_file
    from sdvae.model.info import config_hash

    if Path(args.latents).is_dir():
        from sdvae.cli.dataset import decode_dataset_rows

        return decode_dataset_rows(args)
    if args.row:
        raise UserError(f"{args.latents}: --row applies to an encode-dataset folder, not a latents file")
    tensors, meta = read_latents_file(args.latents)
    if meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{args.latents}: not an sdvae latents file (made by `sdvae encode`)")
    if args.preview or args.preview_only:
        _write_previews(tensors, meta, Path(args.output))
        if args.preview_only:
            return 0
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


def _write_previews(tensors: dict, meta: dict, out_dir: Path) -> None:
    """``decode FILE --preview``: a decoder-free preview of each posterior mean (SD's or arbitrary colours: a
    latents file has no fitted map), at the image's size."""
    from sdvae.cli.options import preview_map
    from sdvae.images.write import save_image, to_pil
    from sdvae.latents.preview import latent_preview

    rgb_map = preview_map(meta)
    factor = 2 ** (len(meta["config"]["block_out_channels"]) - 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in meta["images"]:
        width, height = entry["size"]
        preview = latent_preview(tensors[f"{entry['key']}.mean"][None], upscale=factor, rgb_map=rgb_map)
        dest = out_dir / f"{Path(entry['path']).stem}.{entry['key']}.preview.png"
        save_image(to_pil(preview[..., :height, :width] * 2 - 1), dest, protect=[Path(entry["path"])])
        print(dest)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``encode`` and ``decode`` among the ``sdvae`` subcommands."""
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
                       "row-N.preview.png, a linear map of the latent channels to RGB: the one encode-dataset "
                       "fitted to the images, else SD 1.x/2.x's coefficients for SD's latent space, else "
                       "arbitrary colours, with a note).")
    p.add_argument("latents", help="a .safetensors file from `sdvae encode`, or an encode-dataset output folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row", type=int, action="append", help="dataset row to decode (repeatable; default 0)")
    p.add_argument("--preview", action="store_true", help="also write a decoder-free latent preview per row or image")
    p.add_argument("--preview-only", action="store_true", help="write only the previews (no model needed)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_decode)
