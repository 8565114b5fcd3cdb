"""FLUX.2's original VAE file layout (``black-forest-labs/flux2``, ``src/flux2/autoencoder.py``) ⇄ LDM keys.

The release's ``ae.safetensors`` is the LDM layout with three differences, all handled here:

* the quant convs live inside encoder and decoder: ``encoder.quant_conv.*`` and
  ``decoder.post_quant_conv.*`` (LDM: top-level ``quant_conv.*``/``post_quant_conv.*``);
* ``bn.running_mean``, ``bn.running_var`` (4C floats: the statistics of the 2×2-patchified latents) and
  ``bn.num_batches_tracked`` (int64), the BatchNorm that normalises the latents; diffusers'
  ``AutoencoderKLFlux2`` has the same ``bn.*`` names;
* no key prefix (the release loads the file with ``load_state_dict(strict=True)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError
from sdvae.model.family import FLUX2_DEFAULTS

if TYPE_CHECKING:  # torch loads lazily so importing this module stays cheap
    from torch import Tensor

BN_STATS = ("bn.running_mean", "bn.running_var")
BN_COUNT = "bn.num_batches_tracked"
# original FLUX.2 name -> LDM name
_INNER_QUANT = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def split_flux2(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Separate FLUX.2's BatchNorm and move its inner quant convs to the LDM/diffusers names.

    Args:
        state_dict: a VAE state dict in original FLUX.2, LDM or diffusers naming (no prefix).

    Returns:
        (the rest, in LDM or diffusers naming; the ``bn.*`` tensors, or None when the layout is not FLUX.2's).

    Raises:
        UserError: a FLUX.2 layout (inner quant convs or ``bn.*``) without both BatchNorm statistics.
    """
    import torch

    inner = [k for k in state_dict if k.startswith(tuple(_INNER_QUANT))]
    bn = {k: v for k, v in state_dict.items() if k.startswith("bn.")}
    if not inner and not bn:
        return state_dict, None
    missing = [k for k in BN_STATS if k not in bn]
    if missing:
        why = f"FLUX.2 layout ({inner[0]})" if inner else "FLUX.2 BatchNorm keys"
        raise UserError(f"{why} but the BatchNorm statistics are missing: {', '.join(missing)} (the latent "
                        "normalisation cannot be recovered)")
    unknown = sorted(set(bn) - {*BN_STATS, BN_COUNT})
    if unknown:
        raise UserError(f"unknown BatchNorm key(s) {', '.join(unknown)}: FLUX.2's bn has no affine parameters")
    bn.setdefault(BN_COUNT, torch.tensor(0, dtype=torch.int64))
    rest = {}
    for key, tensor in state_dict.items():
        if key.startswith("bn."):
            continue
        for old, new in _INNER_QUANT.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        rest[key] = tensor
    return rest, bn


def check_bn(bn: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """The FLUX.2 config for ``config`` (inferred from the other weights) after checking ``bn``'s shapes.

    Raises:
        UserError: the statistics do not have 4 × latent_channels entries (e.g. a 4-channel VAE with a
            FLUX.2 BatchNorm), or the count is not a scalar.
    """
    latent = int(config["latent_channels"])
    for key in BN_STATS:
        shape = list(bn[key].shape)
        if shape != [4 * latent]:
            raise UserError(f"{key} has shape {shape}, but a FLUX.2 VAE with {latent} latent channels needs "
                            f"[{4 * latent}] (2x2 patches of every latent channel)")
    if bn[BN_COUNT].numel() != 1:
        raise UserError(f"{BN_COUNT} has shape {list(bn[BN_COUNT].shape)}, expected a scalar")
    return {**config, **FLUX2_DEFAULTS}


def to_original(ldm: dict[str, Tensor], bn: dict[str, Tensor]) -> dict[str, Tensor]:
    """LDM-keyed tensors plus the ``bn.*`` tensors in the release's layout (views, no copies)."""
    out = {}
    for key, tensor in ldm.items():
        for inner, top in _INNER_QUANT.items():
            if key.startswith(top):
                key = inner + key[len(top):]
                break
        out[key] = tensor
    return {**out, **bn}
