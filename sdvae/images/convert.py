"""Pillow modes to float arrays: the colour conversions of :func:`sdvae.images.load.load_image`.

Every function takes a decoded (and EXIF-rotated) Pillow image and returns (H,W,C) float32 in [0, 1], adding
a one-line note for each conversion it makes; the file handling and error messages are
:mod:`sdvae.images.load`'s.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdvae.errors import UserError

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB", "RGB", "RGBA", "RGBa", "RGBX"})
# ITU-R 601-2 luma, the weights of Pillow's "L" conversion (used in float after compositing alpha).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_COLOUR_NAMES = {"P": "palette", "PA": "palette", "LAB": "CIELAB", "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB"}


def to_rgb_array(img: Image.Image, source_bits: int, notes: list[str], keep_alpha: bool = False) -> np.ndarray:
    """Any Pillow mode → (H,W,3) float32 RGB in [0, 1] (``keep_alpha``: (H,W,4) RGBA, straight alpha),
    recording what was done in ``notes``."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _opaque(_gray_to_rgb(_wide_gray(img, source_bits, notes, "RGB")), keep_alpha, notes)

    if source_bits > 8:
        notes.append(f"{source_bits}-bit input reduced to 8-bit")
    if mode == "1":
        notes.append("1-bit black-and-white converted to RGB")
    elif mode in ("L", "LA", "La"):
        notes.append("grayscale converted to RGB")
    elif mode in ("P", "PA"):
        notes.append("palette converted")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("YCbCr", "HSV"):
        notes.append(f"{mode} converted to RGB")
    elif mode == "LAB":
        notes.append("CIELAB converted to sRGB")  # Pillow's convert() goes through littlecms for LAB
    elif mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        raise UserError(f"unsupported colour mode {mode!r}")

    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = _rgba(img)
        if keep_alpha:
            return rgba
        alpha = rgba[..., 3:]
        if (alpha < 1).any():
            notes.append("alpha composited on white")
        return np.ascontiguousarray(rgba[..., :3] * alpha + (1.0 - alpha))  # "over" a white background
    return _opaque(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, keep_alpha, notes)


def to_gray_array(img: Image.Image, source_bits: int, notes: list[str]) -> np.ndarray:
    """Any Pillow mode → (H,W,1) float32 grayscale in [0, 1]: grey modes as they are, colour by luminance
    (ITU-R 601-2, Pillow's "L" conversion), alpha composited on white first (in float)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray(img, source_bits, notes, None)[..., None]
    grey = mode in ("1", "L", "LA", "La")
    if source_bits > 8:
        notes.append(f"{source_bits}-bit input reduced to 8-bit")
    if mode not in _MODES:
        raise UserError(f"unsupported colour mode {mode!r}")
    if not grey:
        notes.append(f"{_COLOUR_NAMES.get(mode, mode)} converted to grayscale (luminance)")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = _rgba(img)
        alpha = rgba[..., 3:]
        if (alpha < 1).any():
            notes.append("alpha composited on white")
        rgb = rgba[..., :3] * alpha + (1.0 - alpha)
        gray = rgb[..., :1] if grey else rgb @ _LUMA[:, None]
        return np.ascontiguousarray(gray, dtype=np.float32)
    if not grey and mode not in ("RGB", "RGBX"):
        img = img.convert("RGB")  # palette, CMYK, YCbCr, HSV, LAB: through RGB as the 3-channel path does
    return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[..., None]


def _rgba(img: Image.Image) -> np.ndarray:
    """(H,W,4) float32 straight-alpha RGBA in [0, 1] of an image with alpha or ``transparency``."""
    if img.mode == "La":  # premultiplied grey+alpha: Pillow only converts it to LA
        img = img.convert("LA")
    return np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0


def _opaque(rgb: np.ndarray, add_alpha: bool, notes: list[str]) -> np.ndarray:
    """``rgb`` itself, or (``add_alpha``) with an opaque alpha channel appended (noted)."""
    if not add_alpha:
        return rgb
    notes.append("alpha added (opaque)")
    return np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=2)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _wide_gray(img: Image.Image, source_bits: int, notes: list[str], target: str | None) -> np.ndarray:
    """16-bit, 32-bit int ("I") or float ("F") grayscale → (H,W) float32 in [0, 1] at full precision.

    ``target``: the mode it is converted to, for the notes ("RGB"), or None when it stays grayscale.
    """
    if img.mode.startswith("I;16"):
        notes.append(f"16-bit grayscale converted to {target} (full precision kept)" if target
                     else "16-bit grayscale read at full precision")
        return np.asarray(img).astype(np.float32) / 65535.0
    if img.mode == "I":
        return _int_to_unit(np.asarray(img), source_bits, notes, target)
    return _float_to_unit(np.asarray(img, dtype=np.float32), notes, target)


def _int_to_unit(values: np.ndarray, source_bits: int, notes: list[str], target: str | None = "RGB") -> np.ndarray:
    """32-bit int grayscale → [0, 1], divided by the maximum of the source's bit depth."""
    if source_bits > 8:
        top = float(2**source_bits - 1)
    else:  # bit depth unknown: Pillow's own "I" sources are 16-bit (see load_image)
        top = 65535.0 if values.max(initial=0) <= 65535 else float(2**31 - 1)
    bits = round(np.log2(top + 1))
    done = f"converted to {target}" if target else "read"
    notes.append(f"{bits}-bit integer grayscale {done} (scaled by 1/{int(top)})")
    return np.clip(values.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)


def _float_to_unit(values: np.ndarray, notes: list[str], target: str | None = "RGB") -> np.ndarray:
    """Float grayscale → [0, 1]: taken as [0, 1] if its maximum is ≤ 1, else as 0..255 (clipped)."""
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, 0.0).astype(np.float32)
        notes.append("non-finite values in float image replaced by 0")
    converted = f" and converted to {target}" if target else ""
    if values.max(initial=0.0) <= 1.0:
        notes.append(f"32-bit float grayscale read as [0, 1]{converted}")
    else:
        values = values / 255.0
        notes.append(f"32-bit float grayscale read as 0..255 (values above 255 clipped){converted}")
    return np.clip(values, 0.0, 1.0).astype(np.float32)
