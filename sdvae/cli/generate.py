"""``sdvae sample`` and ``sdvae interpolate``: what the decoder makes of prior draws and latent paths."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdvae.cli.options import INPUT_NOTES, add_runtime_args, codec_from_args, load_checked, note
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
    for message in codec.notes:
        note(message)
    print(f"wrote {args.n} samples of {ref} ({args.size}x{args.size}, z ~ N(0, {args.temperature:g}²I) in the "
          f"{args.space} latent space, seed {args.seed}) to {out}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from sdvae.eval.latent_space import interpolate_images
    from sdvae.images.compose import labelled_rows
    from sdvae.images.resize import fit_to, resize_shorter
    from sdvae.images.write import check_output_path, save_image

    inputs = [Path(args.image_a), Path(args.image_b)]
    check_output_path(args.output, protect=inputs)
    if args.n < 2:
        raise UserError(f"-n must be at least 2 (the two endpoints), got {args.n}")
    ref, codec = codec_from_args(args)
    if args.size < 0 or 0 < args.size < codec.factor:
        raise UserError(f"--size must be 0 (full resolution) or at least the downsampling factor {codec.factor}, "
                        f"got {args.size}")
    img_a = load_checked(args.image_a, codec.factor, args.tile, codec.channels)
    img_b = load_checked(args.image_b, codec.factor, args.tile, codec.channels)
    notes = [f"{inputs[0].name}: {n}" for n in img_a.notes] + [f"{inputs[1].name}: {n}" for n in img_b.notes]
    tensor_a, tensor_b = img_a.tensor, img_b.tensor
    if args.size and min(img_a.size) > args.size:  # shrink only: never enlarge a small image
        tensor_a = resize_shorter(tensor_a, args.size)
        notes.append(f"{inputs[0].name} resized from {img_a.size[0]}x{img_a.size[1]} to "
                     f"{tensor_a.shape[-1]}x{tensor_a.shape[-2]} (--size {args.size}; 0: full resolution)")
    height, width = tensor_a.shape[-2:]
    if tensor_b.shape[-2:] != (height, width):
        tensor_b = fit_to(tensor_b, (height, width))
        notes.append(f"{inputs[1].name} resized from {img_b.size[0]}x{img_b.size[1]} to cover "
                     f"{width}x{height} (the size of {inputs[0].name}) and center-cropped")
    paths = interpolate_images(codec, tensor_a, tensor_b, args.n, batch_size=args.batch_size)
    steps = [f"t={i / (args.n - 1):.2f}" for i in range(args.n)]
    strip = labelled_rows([("linear", paths["linear"]), ("spherical", paths["spherical"])], column_labels=steps)
    out = save_image(strip, args.output, protect=inputs)
    for message in notes + codec.notes:
        note(message)
    print(f"wrote {args.n} linear and {args.n} spherical steps from {inputs[0].name} to {inputs[1].name} "
          f"({ref}, {width}x{height}) to {out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``sample`` and ``interpolate`` among the ``sdvae`` subcommands."""
    p = sub.add_parser(
        "sample", help="decode prior samples z ~ N(0, I) into a grid image",
        description="Draw z ~ N(0, T²I) in the scaled (diffusion) latent space, map it to the VAE's latents with the "
        "model's scaling (unscale), decode, and save a grid. This shows what the decoder makes of latents of the "
        "data's scale; it is not an image generator (that is the diffusion model's job).")
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("-o", "--output", required=True, help="grid image path (.png, .jpg, .webp...)")
    p.add_argument("--size", type=int, default=256, help="side of each sample in pixels, a multiple of the "
                   "downsampling factor (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="standard deviation of the draw (default 1)")
    p.add_argument("--space", choices=("scaled", "vae"), default="scaled",
                   help="scaled: N(0, I) in the diffusion space, then unscaled (default); vae: N(0, I) on the VAE's "
                   "own latents, the prior of its KL term")
    p.add_argument("--seed", type=int, default=0, help="seed (sample i is the same for any -n)")
    p.add_argument("--nrow", type=int, default=None, help="samples per row (default ceil(sqrt(n)))")
    p.add_argument("--batch-size", type=int, default=8, help="latents decoded per model call (default 8)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "interpolate", help="decode linear and spherical paths between two images' posterior means",
        description="Encode A and B, interpolate between their posterior means linearly and spherically (slerp over "
        "the flattened scaled latent), decode, and save one image with a 'linear' and a 'spherical' row; the "
        "endpoints are the reconstructions of A and B, and each column is labelled with its t. A is first shrunk "
        "to --size (shorter side); B is resized and center-cropped to A's size if they differ. " + INPUT_NOTES)
    p.add_argument("image_a", metavar="A")
    p.add_argument("image_b", metavar="B")
    p.add_argument("-n", type=int, default=8, help="points per path, endpoints included (default 8)")
    p.add_argument("-o", "--output", required=True, help="strip image path (.png, .jpg, .webp...)")
    p.add_argument("--size", type=int, default=256,
                   help="resize A so its shorter side is N pixels before encoding (bicubic, antialiased; only "
                   "ever shrinks), which sets the size of every step (default 256; 0: full resolution)")
    p.add_argument("--batch-size", type=int, default=8, help="latents decoded per model call (default 8)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_interpolate)

