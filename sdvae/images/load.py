"""Image files in: loading that never crashes on bad input (saving: :mod:`sdvae.images.write`).

Everything the model sees goes through :func:`load_image`, which turns any file Pillow can decode into
a (1,C,H,W) float32 tensor in [-1, 1] with the model's C image channels (1 grayscale, 3 RGB, 4 RGBA: the
rule of :mod:`sdvae.images.channels`) and reports every conversion it made as a one-line note
(alpha on white, EXIF rotation, 16-bit, palette, CMYK, luminance, ...). Anything it cannot use — a missing,
empty, truncated or non-image file, or an image above Pillow's decompression-bomb limit — becomes a
:class:`~sdvae.errors.UserError` naming the file, never a traceback or a silently grey image.

Tensor convention throughout: channels first (L, RGB or RGBA), float in [-1, 1] (``-1`` black or
transparent, ``+1`` white or opaque);
8-bit values ``v`` map to ``v / 127.5 - 1`` and back with rounding (see :func:`sdvae.images.write.to_pil`).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdvae.errors import UserError, first_line
from sdvae.images.channels import image_mode
from sdvae.images.convert import to_gray_array as _to_gray_array
from sdvae.images.convert import to_rgb_array as _to_rgb_array

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

_EXIF_ORIENTATION = 0x0112
# Pillow warnings that only describe something load_image handles anyway; others become notes.
_QUIET_WARNINGS = ("Palette images with Transparency expressed in bytes",)


@dataclass
class LoadedImage:
    """A decoded image, ready for the model.

    Attributes:
        tensor: (1,C,H,W) float32 in [-1, 1] (C = the requested channels: L, RGB or RGBA), after EXIF rotation.
        size: (W, H) in pixels (PIL order), after EXIF rotation.
        notes: one-line, human-readable descriptions of the conversions made, e.g.
            ``"alpha composited on white"``; empty for a plain 8-bit file of the requested mode.
    """

    tensor: torch.Tensor
    size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has an image extension we read (png jpg jpeg webp bmp tif tiff gif, any case).

    Only the name is checked (for walking folders cheaply); the content may still be unreadable.
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: PathLike, *, allow_huge: bool = False, channels: int = 3) -> LoadedImage:
    """Decode an image file to a (1,C,H,W) tensor in [-1, 1] with ``channels`` channels (1, 3 or 4).

    Conversions for 3 channels (RGB; each one adds a note):

    * EXIF orientation is applied (``ImageOps.exif_transpose``), so ``size`` is the displayed size;
    * alpha (RGBA, LA, PA, premultiplied modes, palette or grey/RGB ``transparency``) is composited on
      white, in float, so partially transparent pixels are not rounded twice;
    * grayscale ("L", "1"), palette ("P"), CMYK (Pillow's plain conversion, no ICC profile), YCbCr and
      HSV become RGB; CIELAB is converted to sRGB (Pillow uses littlecms for that);
    * 16-bit grayscale ("I;16*") keeps its full precision: values are divided by 65535. Mode "I"
      (32-bit int) is divided by the maximum of its bit depth: the TIFF BitsPerSample when known,
      else 65535 (Pillow's 16-bit sources: old PNGs, PPM/PGM with maxval > 255) unless values exceed
      it, then 2**31 - 1. Negative values are clipped to 0;
    * 16-bit RGB(A)/LA sources, which Pillow only exposes as 8-bit modes, are reduced to 8 bits;
    * float ("F") images are read as [0, 1] when their maximum is ≤ 1, otherwise as 0..255 with
      values above 255 clipped; NaN/inf become 0;
    * multi-frame files (GIF, TIFF, ...) use the first frame.

    With 1 channel (grayscale) the same rules give one grey channel instead: grayscale files (16-bit,
    "I" and "F" included) are read as they are, colour files are converted by luminance (ITU-R 601-2,
    Pillow's "L" conversion; after compositing on white, in float, when they have alpha). With 4 channels
    (RGBA) the colour channels follow the RGB rules but alpha is kept as the 4th channel, never composited;
    files without alpha get an opaque one (+1), noted as "alpha added (opaque)".

    Args:
        path: the image file.
        allow_huge: decode images above Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
            instead of refusing them. The global limit is only lifted while this file is decoded and
            is restored afterwards (the override is process-wide for that moment, so other threads
            decoding at the same instant are unprotected).
        channels: the model's image channel count (:mod:`sdvae.images.channels`); 3 by default.

    Returns:
        The tensor (float32, in [-1, 1]), its (W, H) size and the conversion notes.

    Raises:
        UserError: missing, empty, truncated, corrupt or non-image file; image above the size limit
            without ``allow_huge``; a colour mode that cannot be converted. The message is one line
            starting with the path. A channel count other than 1, 3 or 4: one line naming it (no path).
    """
    image_mode(channels)
    name = str(path)
    _check_regular_file(name)
    try:
        return _decode(name, channels=channels)
    except Image.DecompressionBombError:  # above Pillow's hard limit (2× MAX_IMAGE_PIXELS): no size yet
        if not allow_huge:
            with _pixel_limit_lifted():
                size = _probe_size(name)
            raise _bomb_error(name, size) from None
    except _TooLarge as big:  # between 1× and 2× the limit, where Pillow only warns
        if not allow_huge:
            raise _bomb_error(name, big.size) from None
    # Lifted for load() too: some decoders (TIFF tiles, GIF frames) check the size again there.
    with _pixel_limit_lifted():
        return _decode(name, check_size=False, channels=channels)


def image_to_tensor(img: Image.Image, channels: int = 3) -> LoadedImage:
    """Like :func:`load_image`, for an image already opened or made in memory (e.g. a dataset cell).

    Applies the same conversions and notes; Pillow's decompression-bomb check is the caller's
    (``Image.open`` already did it for a file or buffer).

    Raises:
        UserError: truncated/corrupt data or an unconvertible mode; the message has no file name,
            so callers prefix their own (e.g. ``f"{where}: {err}"``). A channel count other than 1, 3 or 4.
    """
    image_mode(channels)
    notes: list[str] = []
    with _recorded_warnings(notes):
        pixels = _convert(img, notes, channels)
    return _loaded(pixels, notes)


def check_min_size(img_size: tuple[int, int], factor: int, path: PathLike) -> None:
    """Refuse images smaller than one latent cell.

    Args:
        img_size: (W, H) in pixels, as in :attr:`LoadedImage.size`.
        factor: the model's spatial downsampling factor (8 for SD VAEs).
        path: the file, for the message.

    Raises:
        UserError: if either side is smaller than ``factor``.
    """
    width, height = img_size
    if width < factor or height < factor:
        raise UserError(f"{path}: image is {width}×{height} pixels, smaller than one latent cell of this model "
                        f"({factor}×{factor}); use an image at least {factor} pixels on each side")


# --------------------------------------------------------------------------------------------------
# Decoding


def decode_bytes(data: bytes, where: str, channels: int = 3) -> torch.Tensor:
    """Decode an image held in memory (a tar member, a parquet cell) as :func:`image_to_tensor` does.

    Args:
        data: the encoded image (JPEG, PNG, WebP...).
        where: how messages name it (``00003.tar:KEY.jpg``).

    Returns:
        (C,H,W) float32 in [-1,1].

    Raises:
        UserError: ``"WHERE: problem"``, one line, with no object addresses (skip reports stay byte-identical
            across reruns).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return image_to_tensor(img, channels=channels).tensor[0]
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    except UnidentifiedImageError:
        raise UserError(f"{where}: not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as err:
        raise UserError(f"{where}: {first_line(err)}") from None
    except Exception as err:  # one bad member must not end a long run
        raise UserError(f"{where}: unreadable image ({first_line(err, with_type=True)})") from None


class _TooLarge(Exception):
    """Internal: the image opened but is above MAX_IMAGE_PIXELS (where Pillow only warns)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(f"{size[0]}x{size[1]}")
        self.size = size


def _check_regular_file(name: str) -> None:
    """Turn the cheap-to-detect file problems into clear messages before Pillow sees the file."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except OSError as err:
        raise UserError(f"{name}: cannot read ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{name}: is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{name}: not a regular file")
    if st.st_size == 0:
        raise UserError(f"{name}: empty file (0 bytes), not an image")


class ImageTooLarge(UserError):
    """The image is above Pillow's decompression-bomb limit and ``allow_huge`` was not given.

    The message names the file and the size but gives no advice: only the caller knows its own option for
    huge images (``--tile on`` of ``roundtrip``/``encode``), so it adds that (see ``sdvae.cli.options``).
    """


def _bomb_error(name: str, size: tuple[int, int]) -> ImageTooLarge:
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS or 0
    return ImageTooLarge(f"{name}: image is {width}×{height} ({width * height:,} pixels), above the safety limit "
                         f"of {limit:,} pixels for decoding (Pillow's decompression-bomb guard)")


@contextmanager
def _pixel_limit_lifted() -> Iterator[None]:
    """Disable Pillow's decompression-bomb check for the duration (restored even on error)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _probe_size(name: str) -> tuple[int, int]:
    """(W, H) from the header only (call with the pixel limit lifted)."""
    try:
        with Image.open(name) as img:
            return img.size
    except Exception as err:
        raise UserError(f"{name}: not a readable image ({first_line(err, with_type=True)})") from None


def _decode(name: str, *, check_size: bool = True, channels: int = 3) -> LoadedImage:
    notes: list[str] = []
    with _recorded_warnings(notes):
        try:
            img = Image.open(name)
        except (Image.DecompressionBombError, UserError):
            raise
        except UnidentifiedImageError:
            raise UserError(f"{name}: not an image file, or a format Pillow cannot read") from None
        except OSError as err:
            if err.errno is not None:  # the OS refused (permissions, I/O error, ...)
                raise UserError(f"{name}: cannot read ({err.strerror or first_line(err, with_type=True)})") from None
            # Pillow's own OSErrors here mean the header itself is cut short or damaged.
            raise UserError(f"{name}: truncated or corrupt image file ({first_line(err, with_type=True)})") from None
        except Exception as err:  # corrupt headers surface as SyntaxError, ValueError, struct.error, ...
            raise UserError(f"{name}: corrupt image header ({first_line(err, with_type=True)})") from None
        with img:
            limit = Image.MAX_IMAGE_PIXELS
            if check_size and limit is not None and img.width * img.height > limit:
                raise _TooLarge(img.size)
            try:
                pixels = _convert(img, notes, channels)
            except UserError as err:
                raise UserError(f"{name}: {err}") from None
    return _loaded(pixels, notes)


@contextmanager
def _recorded_warnings(notes: list[str]) -> Iterator[None]:
    """Turn Pillow's warnings (corrupt EXIF, ...) into notes instead of stray stderr lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Between 1× and 2× MAX_IMAGE_PIXELS Pillow only warns; load_image checks the size itself.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        finally:
            for w in caught:
                text = " ".join(str(w.message).split()) or type(w.message).__name__
                if not text.startswith(_QUIET_WARNINGS) and f"decoder warning: {text}" not in notes:
                    notes.append(f"decoder warning: {text}")


def _convert(img: Image.Image, notes: list[str], channels: int = 3) -> np.ndarray:
    """Decode an opened image and convert it to (H,W,C) float32 in [0, 1]: L, RGB or RGBA for C = 1, 3, 4.

    Raises UserError with a message that does not name the file (callers add it).
    """
    source_bits = _source_bits(img)  # before load(): load() empties img.tile
    try:
        # Counting frames seeks through the file, so it can hit a damaged frame too.
        frames = getattr(img, "n_frames", 1)
        # Decode now, inside this try: a truncated file raises here (we never set
        # ImageFile.LOAD_TRUNCATED_IMAGES) instead of turning into a partly grey image later.
        img.load()
    except Image.DecompressionBombError:
        raise
    except MemoryError:
        raise UserError(f"not enough memory to decode this {img.width}×{img.height} image") from None
    except Exception as err:
        raise UserError(f"truncated or corrupt image data ({first_line(err, with_type=True)})") from None
    if frames > 1:
        notes.append(f"first of {frames} frames used")
    try:
        img = _apply_exif_orientation(img, notes)
        if channels == 1:
            return _to_gray_array(img, source_bits, notes)
        return _to_rgb_array(img, source_bits, notes, keep_alpha=channels == 4)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"not enough memory to convert this {img.width}×{img.height} image") from None
    except Exception as err:
        raise UserError(f"cannot convert {img.mode} image to {image_mode(channels)} "
                        f"({first_line(err, with_type=True)})") from None


def _loaded(pixels: np.ndarray, notes: list[str]) -> LoadedImage:
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous().mul_(2).sub_(1)
    return LoadedImage(tensor=tensor, size=(pixels.shape[1], pixels.shape[0]), notes=notes)


def _source_bits(img: Image.Image) -> int:
    """Significant bits per sample in the file, where Pillow reveals more than its mode does (else 8).

    Signed integer samples count one bit less (the sign), so ``2**bits - 1`` is always the largest value.
    """
    try:
        return _source_bits_unchecked(img)
    except Exception:  # only used for notes and "I" scaling: a damaged header must not stop decoding
        return 8


def _source_bits_unchecked(img: Image.Image) -> int:
    tag = getattr(img, "tag_v2", None)  # TIFF: BitsPerSample (258), SampleFormat (339; 2 = signed)
    if tag is not None and tag.get(258):
        try:
            bits = max(int(b) for b in tag[258])
            signed = 2 in tuple(tag.get(339) or (1,))
            return bits - 1 if signed else bits
        except (TypeError, ValueError):
            pass
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        if isinstance(rawmode, str) and ";16" in rawmode:  # PNG "RGB;16B", "LA;16B", ...
            return 16
        if img.format == "PPM" and isinstance(args, tuple) and len(args) > 1 and isinstance(args[-1], int):
            # (rawmode, maxval). Pillow rescales maxval > 255 grey to 0..65535 in mode "I".
            return 16 if img.mode == "I" else max(8, int(args[-1]).bit_length())
    return 8


def _apply_exif_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        notes.append("unreadable EXIF data ignored")
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF rotation applied (orientation {orientation})")
    return img
