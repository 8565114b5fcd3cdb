"""The on-disk format of a latent dataset: file names, metadata, stored dtypes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdvae.errors import UserError

DATASET_FORMAT = "sdvae-latent-dataset/1"
DATASET_META = "sdvae_latents.json"  # written last: its presence means the dataset is complete
ENCODE_ARGS = "sdvae_encode_args.json"  # written first: the arguments a resumed run must repeat
# Arrow has no bfloat16: bf16 latents are stored as their raw 16-bit patterns (uint16), which is
# lossless and as small as the tensor; fp16 uses Arrow's halffloat. Readers go through
# :func:`stored_to_tensor`.
ARROW_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


def read_dataset_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset-level metadata of an ``encode-dataset`` output folder.

    Returns:
        The JSON object of ``PATH/sdvae_latents.json``: ``model``, ``config_hash``, ``arch_hash``,
        ``config``, ``preprocessing``, ``store``, ``dtype``, ``latent_columns``, ``scaled`` (False),
        ``scaling`` (the scaling/shift in force at encode time), ``rows``, ``skipped``, ``preview_rgb`` (the
        latent→RGB map fitted at encode time, see :mod:`sdvae.latents.preview`; None or absent in older datasets)...

    Raises:
        UserError: not such a folder, or a run that has not finished (the message says what to do).
    """
    folder = Path(path)
    meta_path = folder / DATASET_META
    if not meta_path.is_file():
        if (folder / ENCODE_ARGS).is_file():
            raise UserError(f"{folder}: encode-dataset has not finished here; run the same command again to "
                            "complete it")
        raise UserError(f"{folder}: not an `sdvae encode-dataset` output (no {DATASET_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_path}: unreadable ({err})") from None
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {DATASET_FORMAT})")
    return meta


def stored_to_tensor(values: Any, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """One stored latent (a flat array from the dataset) → (C,h,w) float32 tensor.

    Args:
        values: flat numpy array (or list) as read from the ``mean``/``logvar``/``latent`` column.
        dtype: the dataset's ``dtype`` (``fp32``/``fp16``/``bf16``; bf16 arrives as uint16 bit patterns).
        shape: (C,h,w) from the row's ``shape`` column.
    """
    import numpy as np

    # np.array copies: rows read from a memory-mapped dataset are read-only buffers.
    if dtype == "bf16":
        tensor = torch.from_numpy(np.array(values, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(values, dtype=ARROW_DTYPES[dtype]))
    return tensor.float().reshape(tuple(int(s) for s in shape))
