"""``sdvae convert``: load any model reference, write it in diffusers or LDM format."""

from __future__ import annotations

import os
from pathlib import Path

from sdvae.errors import UserError
from sdvae.model.save import check_ldm_target, write_ldm


def convert(ref: str | os.PathLike[str], out: str | os.PathLike[str], to: str = "diffusers",
            dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Load any model reference and write it in diffusers or LDM format (``sdvae convert``).

    Args:
        ref: anything :func:`sdvae.model.load.load_vae` accepts (preset, folder, single file, Hub id).
        out: a folder for ``to="diffusers"``, a ``.safetensors`` file for ``to="ldm"``.
        to: 'diffusers' | 'ldm'.
        dtype: 'fp32' | 'fp16' | 'bf16' for the stored weights.
        overwrite: replace an existing output.

    Returns:
        The path written.
    """
    from sdvae.model.dtypes import torch_dtype
    from sdvae.model.load import load_vae
    from sdvae.model.save import save_diffusers

    if to not in ("diffusers", "ldm"):
        raise UserError(f"unknown target format '{to}': choose diffusers or ldm")
    torch_dtype(dtype)  # check before the (possibly slow) load
    if to == "ldm":
        check_ldm_target(out, overwrite)  # fail before the (possibly slow) load
    vae = load_vae(ref)
    if to == "diffusers":
        return save_diffusers(vae, out, dtype=dtype, overwrite=overwrite)
    return write_ldm(vae, out, dtype=dtype, overwrite=overwrite)
