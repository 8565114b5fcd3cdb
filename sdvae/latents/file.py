"""The latents file of ``sdvae encode``: posterior tensors plus metadata in one ``.safetensors``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdvae.atomic import atomic_file
from sdvae.errors import UserError

if TYPE_CHECKING:  # torch loads lazily: the CLI imports this module to build its parser
    import torch


LATENTS_FORMAT = "sdvae-latents/1"


def write_latents_file(tensors: dict[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write latents and their metadata to one ``.safetensors`` file, atomically.

    Args:
        tensors: name -> tensor (e.g. ``"00000.mean"`` (C,h,w)).
        meta: JSON-able metadata (model reference, config hash, whether scaled, image sizes...).
            Stored as JSON under the ``"sdvae"`` key of the safetensors header, with ``format``,
            ``config_hash`` and ``scaled`` also as plain string keys for other readers.
        path: destination; written to a temporary file in the same folder, then renamed.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: latents are written as .safetensors; use that extension")
    header = {"sdvae": json.dumps(meta)}
    header.update({k: str(meta[k]).lower() if isinstance(meta[k], bool) else str(meta[k])
                   for k in ("format", "config_hash", "scaled") if k in meta})
    with atomic_file(dest) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
    return dest


def read_latents_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_latents_file`.

    Returns:
        (tensors, metadata).

    Raises:
        UserError: missing, unreadable or not a latents file; the message names the file.
    """
    from safetensors import safe_open

    src = Path(path)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    try:
        with safe_open(str(src), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{src}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if "sdvae" not in header:
        raise UserError(f"{src}: safetensors file has no sdvae metadata (not written by `sdvae encode`)")
    return tensors, json.loads(header["sdvae"])
