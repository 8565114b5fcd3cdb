"""``sdvae encode`` / ``sdvae decode``: images to a latents file and back; ``decode --row`` decodes rows of a
latent dataset (``sdvae encode-dataset``) the same way."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdvae.cli.options import INPUT_NOTES, add_runtime_args, codec_from_args, load_checked, require_data_extra
from sdvae.errors import UserError
from sdvae.latents.file import LATENTS_FORMAT
from sdvae.model.presets import PRESETS


def cmd_encode(args: argparse.Namespace) -> int:
    from sdvae.latents.file import write_latents_file
    from sdvae.model.info import config_dict, config_hash

    ref, codec = codec_from_args(args)
    tensors, entries = {}, []
    for i, path in enumerate(args.images):
        img = load_checked(path, codec.factor, args.tile, codec.channels)
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
        return _decode_dataset_rows(args)
    if args.row:
        raise UserError(f"{args.latents}: --row applies to an encode-dataset folder, not a latents file")
    tensors, meta = read_latents_file(args.latents)
    if meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{args.latents}: not an sdvae latents file (made by `sdvae encode`)")
    if args.preview or args.preview_only:
        _write_previews(tensors, meta, Path(args.output))
        if args.preview_only:
            return 0
    args.model = args.model or _recorded_model(meta)
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


def _decode_dataset_rows(args: argparse.Namespace) -> int:
    """``sdvae decode OUT --row N``: decode (and/or preview) rows of an encode-dataset output."""
    require_data_extra("sdvae decode --row")
    from sdvae.cli.options import preview_map
    from sdvae.images.write import save_image, to_pil
    from sdvae.latents.dataset import LatentDataset
    from sdvae.latents.format import read_dataset_meta
    from sdvae.latents.preview import latent_preview
    from sdvae.model.info import config_dict, latent_space_hash

    meta = read_dataset_meta(args.latents)
    data = LatentDataset(args.latents, seed=args.seed, scaled=False, sample=args.sample, columns=[], flip="never")
    rows = args.row or [0]
    bad = [r for r in rows if not 0 <= r < len(data)]
    if bad:
        raise UserError(f"{args.latents}: no row {bad[0]} (the dataset has {len(data)} rows)")
    codec = None
    if not args.preview_only:
        args.model = args.model or _recorded_model(meta)
        ref, codec = codec_from_args(args)
        # Unscaled latents depend on the architecture and weights, not on the scaling keys (which
        # `latent-stats --write-config` may have changed since), so those are left out of the check.
        if latent_space_hash(config_dict(codec.master)) != meta["arch_hash"]:
            raise UserError(f"{args.latents}: latents were made by {meta['model']} (config hash "
                            f"{meta['config_hash']}), whose architecture differs from {ref}'s; "
                            "pass the matching --model")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    rgb_map = preview_map(meta) if args.preview or args.preview_only else None
    for row in rows:
        z, _ = data.unscaled(row)
        stem = f"row-{row:06d}"
        if codec is not None:
            dest = out_dir / f"{stem}.png"
            save_image(to_pil(codec.decode(z[None])), dest)
            print(dest)
        if args.preview or args.preview_only:
            preview = latent_preview(z[None], upscale=meta["downsampling_factor"], rgb_map=rgb_map)
            dest = out_dir / f"{stem}.preview.png"
            save_image(to_pil(preview * 2 - 1), dest)
            print(dest)
    return 0


def _recorded_model(meta: dict) -> str | None:
    """The model recorded in a latents file's or dataset's metadata, if it can still be loaded from here
    (a preset or an existing path); else None (the default model, checked against the recorded hash)."""
    return meta["model"] if meta["model"] in PRESETS or Path(meta["model"]).exists() else None


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
