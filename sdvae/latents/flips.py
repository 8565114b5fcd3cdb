"""``encode-dataset --hflip both``: the latents of the horizontally mirrored image, stored beside the row's own.

Layout: extra columns in the *same* row — ``mean_flip`` + ``logvar_flip`` (``--store mean_logvar``)
or ``latent_flip`` — rather than a second row with a ``flipped`` flag, because

* a row stays one image: ``index``/``key`` stay unique, ``rows`` counts images, ``skipped`` and the
  carried columns (captions, labels) are not duplicated, and the statistics are not double-counted;
* a loader flips with probability ½ by choosing a column (:class:`LatentDataset`'s ``flip``), so an
  epoch keeps its length and the two mirror images never land in one batch as near-duplicates;
* a flipped latent is *not* the mirror of the unflipped latent (the encoder is not equivariant to
  flips), so the copy must come from encoding the mirrored pixels — exactly what is stored here.

The flipped copy is the encoding of the mirrored *crop* (the very pixels that were encoded, mirrored),
and its crop box in the mirrored resized image is ``[top, W − left − w, h, w]``
(:func:`flipped_crop_box`), which is what SDXL's crop conditioning should see for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdvae.seeding import seeded_generator

HFLIP = ("none", "both")
FLIP_SUFFIX = "_flip"


def flip_columns(columns: Sequence[str]) -> list[str]:
    """The flipped copies' column names of the given latent columns (``mean`` → ``mean_flip``)."""
    return [f"{c}{FLIP_SUFFIX}" for c in columns]


def with_flips(pixels: torch.Tensor, hflip: str) -> torch.Tensor:
    """The batch to encode: (b,C,h,w), followed by its mirror images when ``hflip`` is ``both``."""
    return torch.cat([pixels, pixels.flip(-1)]) if hflip == "both" else pixels


def flipped_crop_box(box: Sequence[int], resized: Sequence[int]) -> list[int]:
    """A crop box [top, left, h, w] of a resized image of size ``resized`` [H, W], in its mirror image."""
    top, left, h, w = (int(v) for v in box)
    return [top, int(resized[1]) - left - w, h, w]


def row_latents(mean: torch.Tensor, logvar: torch.Tensor, j: int, b: int, store: str, seed: int, index: int,
                hflip: str) -> dict[str, torch.Tensor]:
    """The stored latent columns of item ``j`` of an encoded batch of ``b`` items (then, with ``hflip``
    ``both``, their ``b`` mirror images): ``mean``/``logvar`` or ``latent`` (``--store sample``: one
    posterior draw seeded by the input index, the same in any run or process), plus the ``*_flip`` ones.
    """
    tensors = {}
    for suffix, k, purpose in [("", j, "encode-sample"), (FLIP_SUFFIX, b + j, "encode-sample-flip")][
            :2 if hflip == "both" else 1]:
        if store == "mean_logvar":
            tensors.update({f"mean{suffix}": mean[k], f"logvar{suffix}": logvar[k]})
        elif store == "mean":
            tensors[f"latent{suffix}"] = mean[k]
        else:
            eps = torch.randn(mean[k].shape, generator=seeded_generator(seed, purpose, index))
            tensors[f"latent{suffix}"] = mean[k] + torch.exp(0.5 * logvar[k]) * eps
    return tensors
