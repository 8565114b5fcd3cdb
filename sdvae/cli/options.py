"""What every ``sdvae`` command shares: the model/runtime options, the default model, loading an input.

The default model is the embedded checkpoint, shipped inside the package as ``sdvae/checkpoints/sdvae-tiny-f8c4``
(package data, so editable and wheel installs both have it; the repository's ``checkpoints/sdvae-tiny-f8c4`` is
a symlink to that folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdvae.errors import UserError
from sdvae.model.dtypes import DTYPE_CHOICES
from sdvae.model.presets import PRESETS

EMBEDDED = Path(__file__).resolve().parents[1] / "checkpoints" / "sdvae-tiny-f8c4"
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


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    from sdvae.codec import TILE_MODES

    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--tile", choices=TILE_MODES, default="auto",
                   help="exact tiled encode/decode with bounded memory (auto: on for large images)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute precision. auto (default): bf16 where the hardware computes it natively (CUDA "
                   "GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp32. fp16/bf16 fall back to fp32 on "
                   "non-finite output; --json reports the precision used")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def codec_from_args(args: argparse.Namespace):
    import torch

    from sdvae.codec.codec import Codec
    from sdvae.model.load import load_vae

    ref = args.model or default_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return ref, Codec(load_vae(ref), device=device, dtype=args.dtype, tile=args.tile)


def load_checked(path: str, factor: int, tile: str):
    from sdvae.images.load import check_min_size, load_image

    img = load_image(path, allow_huge=(tile == "on"))
    check_min_size(img.size, factor, path)
    return img


def note(message: str) -> None:
    """A human note: on stderr, so stdout carries only results (text, paths or one JSON object)."""
    print(f"note: {message}", file=sys.stderr)


def preview_map(meta: dict):
    """The latent→RGB map for ``decode --preview`` of a dataset or latents file (``meta``: its metadata): the
    map fitted at encode time, else SD's or an arbitrary one, noted (see sdvae.latents.preview)."""
    from sdvae.latents.preview import preview_rgb_map

    rgb_map = preview_rgb_map(meta["config"], meta.get("preview_rgb"))
    if rgb_map.source == "arbitrary":
        note("preview colours are arbitrary (no latent-to-RGB map fitted at encode time and not SD 1.x/2.x's "
             "latent space); re-encode with encode-dataset to fit one")
    return rgb_map


def default_output(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}.{suffix}.png")
