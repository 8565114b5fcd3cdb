"""``sdvae sample`` and ``sdvae interpolate``: what the decoder makes of prior draws and latent paths."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdvae.cli.options import (
    codec_from_args,
    load_checked,
)
from sdvae.errors import UserError


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    from sdvae.eval.latent_space import sample_images
    from sdvae.images.compose import image_grid
    from sdvae.images.write import check_output_path, save_image

    check_output_path(args.output)
    if args.nrow is not None and args.nrow < 1:
        raise UserError(f"--nrow must be at least 1, got {args.nrow}")
    ref, codec = codec_from_args(args)
    images = sample_images(codec, args.n, (args.size, args.size), temperature=args.temperature, seed=args.seed,
                           space=args.space, batch_size=args.batch_size)
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    out = save_image(image_grid(images, nrow), args.output)
    for note in codec.notes:
        print(f"note: {note}")
    print(f"wrote {args.n} samples of {ref} ({args.size}x{args.size}, z ~ N(0, {args.temperature:g}²I) in the "
          f"{args.space} latent space, seed {args.seed}) to {out}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from sdvae.eval.latent_space import interpolate_images
    from sdvae.images.compose import labelled_rows
    from sdvae.images.resize import fit_to
    from sdvae.images.write import check_output_path, save_image

    inputs = [Path(args.image_a), Path(args.image_b)]
    check_output_path(args.output, protect=inputs)
    if args.n < 2:
        raise UserError(f"-n must be at least 2 (the two endpoints), got {args.n}")
    ref, codec = codec_from_args(args)
    img_a = load_checked(args.image_a, codec.factor, args.tile)
    img_b = load_checked(args.image_b, codec.factor, args.tile)
    notes = [f"{inputs[0].name}: {n}" for n in img_a.notes] + [f"{inputs[1].name}: {n}" for n in img_b.notes]
    tensor_b = img_b.tensor
    if img_b.size != img_a.size:
        tensor_b = fit_to(tensor_b, (img_a.size[1], img_a.size[0]))
        notes.append(f"{inputs[1].name} resized from {img_b.size[0]}x{img_b.size[1]} to cover "
                     f"{img_a.size[0]}x{img_a.size[1]} (the size of {inputs[0].name}) and center-cropped")
    paths = interpolate_images(codec, img_a.tensor, tensor_b, args.n, batch_size=args.batch_size)
    strip = labelled_rows([("linear", paths["linear"]), ("spherical", paths["spherical"])])
    out = save_image(strip, args.output, protect=inputs)
    for note in notes + codec.notes:
        print(f"note: {note}")
    print(f"wrote {args.n} linear and {args.n} spherical steps from {inputs[0].name} to {inputs[1].name} "
          f"({ref}) to {out}")
    return 0
