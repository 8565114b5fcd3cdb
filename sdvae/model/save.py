"""Writing models: a diffusers folder or one LDM-keyed ``.safetensors`` file, both atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sdvae.errors import UserError
from sdvae.model.dtypes import torch_dtype
from sdvae.model.flux2_keys import split_flux2, to_original
from sdvae.model.ldm_keys import diffusers_to_ldm
from sdvae.model.single_file import CONFIG_METADATA_KEY

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    import torch

    from sdvae.model.family import VAE


def cast_weights(vae: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU copies of the state dict with floating tensors in ``dtype`` (counters such as FLUX.2's
    ``bn.num_batches_tracked`` keep their integer type)."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in vae.state_dict().items()}


def check_ldm_target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """The checks :func:`write_ldm` makes before writing (run them before any slow load)."""
    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"{out}: LDM output must be a .safetensors file")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a .safetensors file name")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    return out


def write_ldm(vae: VAE, path: str | os.PathLike[str], dtype: str = "fp32",
              overwrite: bool = False) -> Path:
    """Write the model as one LDM-keyed ``.safetensors`` file, atomically.

    The file is written atomically (:func:`sdvae.atomic.atomic_file`). A FLUX.2 VAE is written in the
    layout of FLUX.2's own release (``bn.*``, ``encoder.quant_conv``; :mod:`sdvae.model.flux2_keys`). The full
    config is stored in the file's metadata (key :data:`CONFIG_METADATA_KEY`) so that
    :func:`read_single_file` restores what shapes cannot tell; other readers ignore it. The file loads
    with ``AutoencoderKL.from_single_file(path, config=<diffusers folder>)``.

    Args:
        vae: the model (not modified: cast copies are written).
        path: destination ``.safetensors`` file.
        dtype: 'fp32' | 'fp16' | 'bf16' for the stored weights.
        overwrite: replace an existing file; otherwise an existing ``path`` is an error.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from sdvae.atomic import atomic_file
    from sdvae.model.dtypes import torch_dtype
    from sdvae.model.info import config_dict

    out = check_ldm_target(path, overwrite)
    target = torch_dtype(dtype)
    weights, bn = split_flux2(cast_weights(vae, target))
    ldm = diffusers_to_ldm(weights)
    if bn is not None:
        ldm = to_original(ldm, bn)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config_dict(vae), sort_keys=True)}
    with atomic_file(out) as tmp:
        save_file(ldm, tmp, metadata=metadata)
    return out


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_diffusers(vae: VAE, out: str | os.PathLike[str], dtype: str = "fp32",
                   overwrite: bool = False) -> Path:
    """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors) atomically.

    The folder is written under a temporary name beside ``out`` and renamed into place
    (:func:`sdvae.atomic.atomic_dir`), so ``out`` is never half-written.

    Args:
        vae: the model to save (not modified: a cast copy is written).
        out: destination folder.
        dtype: 'fp32' | 'fp16' | 'bf16' for the stored weights.
        overwrite: replace an existing ``out``; otherwise an existing non-empty ``out`` is an error.
    """
    out_path = Path(out)
    if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())) and not overwrite:
        raise UserError(f"{out_path}: already exists (pass --force to replace it)")
    target = torch_dtype(dtype)
    from safetensors.torch import save_file

    from sdvae.atomic import atomic_dir

    with atomic_dir(out_path) as tmp:
        # Written by hand rather than with save_pretrained so the model is not cast in place; this is
        # exactly the layout from_pretrained reads.
        vae.save_config(tmp)
        save_file(cast_weights(vae, target), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return out_path
