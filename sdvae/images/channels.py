"""How many image channels a model reads and writes: the one rule every command loads and saves images by.

A VAE's ``in_channels`` (encoder input) and ``out_channels`` (decoder output) say what an image is to it;
sdvae reads and writes three kinds (:data:`CHANNEL_MODES`):

* 1 channel: grayscale (Pillow "L"); colour files are converted by luminance (ITU-R 601-2, Pillow's own
  "L" conversion), alpha is composited on white;
* 3 channels: RGB, alpha composited on white (the SD family);
* 4 channels: RGBA with straight (not premultiplied) alpha kept as the 4th channel; files without alpha
  get an opaque one (+1).

Any other count is a :class:`~sdvae.errors.UserError` naming the model's count (:func:`image_mode`). Tensors
are (…,C,H,W) in [-1, 1] whatever C is; :func:`rgb_view` gives the 3-channel view that RGB-only networks
(LPIPS, Inception for rFID) and the latent preview's colour fit use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdvae.errors import UserError

# Channel count → the Pillow mode images are read into and written from.
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def image_mode(channels: int) -> str:
    """The Pillow mode of a ``channels``-channel model's images: "L", "RGB" or "RGBA".

    Raises:
        UserError: any other count, in one line naming it.
    """
    if channels not in CHANNEL_MODES:
        raise UserError(f"the model has {channels} image channels; sdvae reads and writes images as 1 (grayscale), "
                        "3 (RGB) or 4 (RGBA) channels")
    return CHANNEL_MODES[channels]


def model_channels(config: Mapping[str, Any]) -> int:
    """The image channel count of a VAE config (``vae.config``): its ``in_channels``, checked.

    Raises:
        UserError: ``in_channels`` differs from ``out_channels``, or is not a count :func:`image_mode` takes.
    """
    reads, writes = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    if reads != writes:
        raise UserError(f"the model reads {reads} and writes {writes} image channels; sdvae needs the same count "
                        "both ways (1 grayscale, 3 RGB or 4 RGBA)")
    image_mode(reads)
    return reads


def describe_channels(channels: int) -> str:
    """One phrase for reports and metadata, e.g. ``"1 channel (grayscale; colour by luminance, alpha on white)"``."""
    image_mode(channels)
    return {
        1: "1 channel (grayscale; colour converted by luminance, alpha composited on white)",
        3: "3 channels (RGB; alpha composited on white)",
        4: "4 channels (RGBA; straight alpha kept, opaque where the file has none)",
    }[channels]


def rgb_view(images: torch.Tensor) -> torch.Tensor:
    """The RGB view of (…,C,H,W) images for RGB-only consumers: grayscale repeated to 3 channels, RGB as is
    (the same tensor), RGBA's colour channels (alpha left out).

    Raises:
        ValueError: C is not 1, 3 or 4.
    """
    channels = images.shape[-3]
    if channels == 3:
        return images
    if channels == 1:
        return torch.cat([images] * 3, dim=-3)
    if channels == 4:
        return images[..., :3, :, :]
    raise ValueError(f"rgb_view takes 1, 3 or 4 channels, got {channels} ({tuple(images.shape)})")
