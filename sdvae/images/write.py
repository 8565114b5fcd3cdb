"""Images people look at: tensor → 8-bit PIL, atomic saving in any common format.

The inverse of :mod:`sdvae.images.load` (which reads files into tensors): :func:`to_pil` maps a model-space
tensor in [-1, 1] back to 8-bit with rounding, in the mode of its channel count (1 → L, 3 → RGB, 4 → RGBA,
see :mod:`sdvae.images.channels`), and :func:`save_image` writes atomically and never over an input.
Comparisons and grids are :mod:`sdvae.images.compose`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from sdvae.atomic import atomic_file
from sdvae.errors import UserError
from sdvae.images.channels import CHANNEL_MODES

PathLike = str | os.PathLike

# Extension → (Pillow format, save options). JPEG: quality 95 and no chroma subsampling, so a saved
# reconstruction is not visibly worse than the tensor it came from; WebP: lossless for the same reason, and
# exact (the colour under fully transparent pixels of an RGBA model's output is kept, not zeroed).
_SAVE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"lossless": True, "exact": True}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
}


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Convert a model-space image to an 8-bit PIL image: L, RGB or RGBA for 1, 3 or 4 channels.

    Args:
        tensor: (C,H,W) or (1,C,H,W) with C 1, 3 or 4, any float dtype and device, nominally in [-1, 1].
            Values outside are clamped; NaN becomes 0 (mid grey; half transparent in alpha).

    Returns:
        An image of size (W, H): ``round((x + 1) * 127.5)``, the inverse of :func:`load_image`
        for 8-bit inputs (rounding, not truncation, so an 8-bit image survives a round trip exactly).
    """
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {tensor.shape[0]}")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] not in CHANNEL_MODES:
        raise ValueError(f"to_pil expects (C,H,W) or (1,C,H,W) with C 1, 3 or 4, got {tuple(tensor.shape)}")
    x = torch.nan_to_num(tensor.detach().float().cpu(), nan=0.0).clamp(-1, 1)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    mode = CHANNEL_MODES[tensor.shape[0]]
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def save_image(img: Image.Image | torch.Tensor, path: PathLike, *, protect: Iterable[PathLike] = ()) -> Path:
    """Write an image atomically; the format comes from the extension.

    Written with :func:`sdvae.atomic.atomic_file`: readers never see a half-written file, and a
    failed write leaves any existing file untouched and no temporary file behind.

    Args:
        img: a PIL image, or a (C,H,W)/(1,C,H,W) tensor in [-1, 1] (converted with :func:`to_pil`: L, RGB
            or RGBA, written in that mode; other PIL modes are written as RGB).
        path: destination; ``.png``, ``.jpg``/``.jpeg`` (quality 95, 4:4:4), ``.webp`` (lossless),
            ``.bmp``, ``.tif``/``.tiff`` (any case).
        protect: paths that must never be overwritten (the inputs). Compared after resolving
            symlinks and ``..``, and by inode when both exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: unknown extension, protected destination, destination is a folder, an RGBA image
            for JPEG or BMP (which keep no alpha), or the file system refuses the write. A missing folder is created.
    """
    dest = check_output_path(path, protect=protect)
    fmt_options = _SAVE_FORMATS[dest.suffix.lower()]
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    fmt, options = fmt_options
    if fmt in ("JPEG", "BMP") and pil.mode == "RGBA":
        raise UserError(f"{dest}: {fmt} keeps no alpha channel and this image is RGBA; use .png, .webp or .tif")
    if pil.mode not in ("RGB", "RGBA", "L"):
        pil = pil.convert("RGB")
    try:
        with atomic_file(dest) as tmp, open(tmp, "wb") as f:
            pil.save(f, format=fmt, **options)
    except OSError as err:
        raise UserError(f"{dest}: cannot write ({err.strerror or err})") from None
    return dest


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # e.g. a symlink loop: fall back to the inode check
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: PathLike, *, protect: Iterable[PathLike] = ()) -> Path:
    """The checks :func:`save_image` makes before writing, for commands to run before any slow work.

    Raises:
        UserError: unknown extension, a protected destination (an input), or a destination that is a folder.
    """
    dest = Path(path)
    if dest.suffix.lower() not in _SAVE_FORMATS:
        known = ", ".join(sorted(_SAVE_FORMATS))
        raise UserError(f"{dest}: unknown image extension {dest.suffix or '(none)'!r}; use one of {known}")
    for guarded in protect:
        if _same_file(dest, Path(guarded)):
            raise UserError(f"{dest}: refusing to overwrite the input image {guarded}; choose another output path")
    if dest.is_dir():
        raise UserError(f"{dest}: is a folder; give an image file name")
    return dest
