"""One preprocessed batch of ``encode-dataset`` → its rows' latents, in the stored dtype, and the preview-map sums."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdvae.latents.flips import row_latents, with_flips
from sdvae.latents.preview import rgb_fit_sums


def encode_batch(codec: Any, batch: dict[str, Any], store: str, dtype: str, seed: int,
                  hflip: str = "none") -> None:
    """Encode the readable items of a collated batch in place (adds ``latents``: column → flat numpy array).

    With ``hflip`` ``both`` the mirrored pixels are encoded in the same model call and stored under
    the ``*_flip`` columns (:mod:`sdvae.latents.flips`).
    """
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for pixels, group in batch["groups"]:
        enc = codec.encode(with_flips(pixels, hflip))  # (b or 2b,C,h,w) float32 moments
        mean, logvar = enc.mean.cpu(), enc.logvar.cpu()
        own = mean[: len(pixels)]  # the preview map is fitted on the images as given (not the mirrored copies)
        xtx, xty = rgb_fit_sums(own, pixels)
        batch["rgb_fit"] = add_fit(batch.get("rgb_fit"), {"xtx": xtx, "xty": xty, "cells": own[:, 0].numel()})
        for j, item in enumerate(group):
            tensors = row_latents(mean, logvar, j, len(group), store, seed, item["index"], hflip)
            item["shape"] = list(mean[j].shape)
            item["latents"] = {name: to_numpy(t.to(target)) for name, t in tensors.items()}


def add_fit(total: dict[str, Any] | None, sums: dict[str, Any] | None) -> dict[str, Any] | None:
    """Add up preview-map fit sums ``{"xtx", "xty", "cells"}`` (see :func:`sdvae.latents.preview.rgb_fit_sums`)."""
    if total is None or sums is None:
        return sums if total is None else total
    return {key: total[key] + sums[key] for key in ("xtx", "xty", "cells")}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Flat numpy view of a latent in its storage type (bf16 → its uint16 bit patterns)."""
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
