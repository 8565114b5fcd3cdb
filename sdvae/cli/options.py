"""What every ``sdvae`` command shares: the model/runtime options, the default model, loading an input.

The default model is the embedded checkpoint (:data:`sdvae.model.presets.EMBEDDED_CHECKPOINT`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdvae.errors import UserError, require_extra
from sdvae.model.dtypes import DTYPE_CHOICES
from sdvae.model.presets import EMBEDDED_CHECKPOINT as EMBEDDED
from sdvae.model.presets import PRESETS

MODEL_HELP = (
    "model: a preset (" + ", ".join(PRESETS) + "), a diffusers folder, a single-file LDM/A1111 checkpoint "
    "(.safetensors/.ckpt/.pt/.pth) or FLUX.2 release file (ae.safetensors), or a Hugging Face Hub id. "
    "Default: the embedded checkpoint "
    f"({EMBEDDED.name}) when present."
)
INPUT_NOTES = (
    "Inputs: any format Pillow reads, read to the model's image channels (its in_channels): 3 (RGB, the SD "
    "family): alpha is composited on white, grayscale, palette, CMYK and 16-bit images are converted to "
    "8-bit-range RGB; 1 (grayscale): colour images are converted by luminance, alpha composited on white, "
    "16-bit grayscale kept at full precision; 4 (RGBA): alpha is kept (opaque where the file has none). "
    "Outputs are written in the same mode (L, RGB or RGBA). EXIF rotation is applied. Sides that are not "
    "multiples of the downsampling factor are reflect-padded, then cropped back."
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
    from sdvae.codec.codec import Codec
    from sdvae.device import resolve_device
    from sdvae.model.load import load_vae

    ref = args.model or default_model()
    device = resolve_device(args.device)
    return ref, Codec(load_vae(ref), device=device, dtype=args.dtype, tile=args.tile)


def load_checked(path: str, factor: int, tile: str, channels: int = 3):
    """An input image for a command, read to ``channels`` (the model's: ``codec.channels``), at least one latent
    cell in size."""
    from sdvae.images.load import ImageTooLarge, check_min_size, load_image

    try:
        img = load_image(path, allow_huge=(tile == "on"), channels=channels)
    except ImageTooLarge as err:
        raise UserError(f"{err}; pass --tile on to process it anyway") from None
    check_min_size(img.size, factor, path)
    return img


def require_data_extra(what: str) -> None:
    """One line naming ``sdvae[data]`` when ``datasets``/``pyarrow`` (needed by ``what``) are missing."""
    require_extra("datasets", what)
    require_extra("pyarrow", what)


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
