"""AutoencoderKL weight files in both naming schemes: reading any single file, writing LDM files.

:func:`read_single_file` reads one ``.safetensors``/``.ckpt``/``.pt``/``.pth``/``.bin`` file in
original LDM (CompVis, A1111) or diffusers naming, with or without a full-checkpoint prefix, and
detects which naming it uses; :func:`write_ldm` writes one LDM-keyed ``.safetensors`` file;
:func:`convert` is ``sdvae convert``. The key renaming itself, with its exact key and shape checks,
is :mod:`sdvae.model.ldm_keys`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError, first_line
from sdvae.model.family import is_flux2
from sdvae.model.file_checks import check_safetensors
from sdvae.model.flux2_keys import check_bn, split_flux2
from sdvae.model.ldm_keys import diffusers_to_ldm, infer_config_from_ldm, ldm_to_diffusers, name_keys

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    from torch import Tensor

# Prefixes under which full checkpoints keep their VAE: original SD (``first_stage_model.``) and
# some all-in-one exports (``vae.``). The first one found wins.
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Top-level names of the VAE's own modules (the same in both naming schemes).
_VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Training state that standalone LDM autoencoder checkpoints carry beside the weights (the
# discriminator/LPIPS loss and LitEma's flattened shadow copies). They are not VAE weights.
_TRAINING_PREFIXES = ("loss.", "model_ema.")
# safetensors metadata key under which write_ldm records the full config. It carries what the
# weights cannot tell (the GroupNorm group count, scaling), so our own files load back exactly.
CONFIG_METADATA_KEY = "sdvae_config"
_DIFFUSERS_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_norm_out.")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """VAE tensors (prefix removed) and the metadata of a .safetensors file; only VAE tensors are read."""
    from safetensors import safe_open

    check_safetensors(path)  # structure first: one clear line instead of a parser's message
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            # A full SD checkpoint is gigabytes: read only the VAE's tensors.
            wanted = _vae_keys(list(f.keys()))
            return {new: f.get_tensor(old) for old, new in wanted.items()}, dict(f.metadata() or {})
    except UserError:
        raise
    except Exception as err:  # SafetensorError, OSError, ...: all mean "this file cannot be read"
        raise UserError(f"{path}: not a readable .safetensors file ({first_line(err)})") from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    """VAE tensors (prefix removed) of a .ckpt/.pt/.pth/.bin file, read with weights_only=True (no code runs)."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter is not for our users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's restricted unpickler refuses classes/functions ("Unsupported global: GLOBAL x.y", or
        # "unsupported GLOBAL x.y whose module ..." in newer versions)
        # and opcodes it does not allow ("Unsupported operand N"); loading such a file would need
        # weights_only=False, i.e. running code from the file. Anything else (truncated zip, not a
        # pickle at all, I/O errors) is plain corruption.
        found = re.search(r"unsupported (?:global: )?GLOBAL ([^\s]+)|unsupported operand \d+", str(err), re.IGNORECASE)
        if found:
            what = found.group(1) or found.group(0)
            raise UserError(f"{path}: refused: loading it needs unsafe unpickling ({what}); only tensor checkpoints "
                            "that torch.load(weights_only=True) accepts are read") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint "
                        f"({first_line(err, with_type=True)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning/LDM training checkpoints nest the weights
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    out = {new: obj[old] for old, new in _vae_keys([k for k in obj if isinstance(k, str)]).items()}
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: {name_keys(bad)} is not a tensor")
    return out


def _vae_keys(keys: list[str]) -> dict[str, str]:
    """The keys that belong to the VAE, mapped to their names without prefix.

    Those under the first known prefix found (the rest of a full checkpoint is dropped); without a
    prefix, every key except LDM training state.
    """
    for prefix in VAE_PREFIXES:
        inside = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
        if inside:
            return inside
    return {k: k for k in keys if not k.startswith(_TRAINING_PREFIXES)}


def _config_from_metadata(metadata: dict[str, str], inferred: dict[str, Any]) -> dict[str, Any]:
    """Facts that write_ldm recorded and the weights cannot tell, if they agree with the weights.

    Returns only keys that are safe to take: the group count (when it divides every channel count),
    the activation, and the scaling/size settings. A record whose architecture disagrees with the
    tensors is stale and ignored: the weights are the truth.
    """
    try:
        recorded = json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        if key in recorded and recorded[key] != inferred[key]:
            return {}
    keys = (("act_fn", "sample_size", "batch_norm_eps", "batch_norm_momentum") if is_flux2(inferred) else
            ("act_fn", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size"))
    taken = {k: recorded[k] for k in keys if k in recorded}
    groups = recorded.get("norm_num_groups")
    if isinstance(groups, int) and groups > 0 and all(c % groups == 0 for c in inferred["block_out_channels"]):
        taken["norm_num_groups"] = groups
    return taken


def read_single_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read one weights file: original LDM / A1111 naming or diffusers naming, any prefix.

    ``.safetensors`` is read with safetensors; ``.ckpt``/``.pt``/``.pth``/``.bin`` only with
    ``torch.load(weights_only=True)``, so a pickle that would run code is refused. A top-level
    ``state_dict`` entry is unwrapped. Of a full Stable Diffusion checkpoint only the
    ``first_stage_model.`` (or ``vae.``) part is used; in unprefixed files LDM training state
    (``loss.*``, ``model_ema.*``) is skipped. Everything else must map exactly.

    Args:
        path: the file.

    FLUX.2's original layout (``bn.*`` statistics, quant convs inside encoder/decoder) is read too
    (:mod:`sdvae.model.flux2_keys`); the config is then an ``AutoencoderKLFlux2`` one.

    Returns:
        (AutoencoderKL/AutoencoderKLFlux2 kwargs inferred from the tensor shapes, diffusers-keyed state
        dict). Files written by :func:`write_ldm` also give back their group count, activation and scaling.

    Raises:
        UserError: the file is missing, unreadable, unsafe, or holds no (complete) AutoencoderKL;
            the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a weights file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    metadata: dict[str, str] = {}
    if suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(path)
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        state_dict = _read_torch(path)
    else:
        raise UserError(f"{path}: unsupported weights file type '{path.suffix}' "
                        "(use .safetensors, .ckpt, .pt, .pth or .bin)")
    if not any(k.startswith(_VAE_MODULES) for k in state_dict):
        raise UserError(f"{path}: no VAE weights found (no encoder.*/decoder.* keys, "
                        f"with or without a {' or '.join(VAE_PREFIXES)} prefix)")
    try:
        state_dict, bn = split_flux2(state_dict)  # FLUX.2's BatchNorm and inner quant convs (flux2_keys)
        in_diffusers_naming = any(marker in k for k in state_dict for marker in _DIFFUSERS_MARKERS)
        ldm = diffusers_to_ldm(state_dict) if in_diffusers_naming else state_dict
        # Always going through LDM validates every key and shape and normalises old attention names.
        diffusers = ldm_to_diffusers(ldm)
        config = infer_config_from_ldm(ldm)
        if bn is not None:
            config = check_bn(bn, config)
            diffusers.update(bn)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    config.update(_config_from_metadata(metadata, config))
    return config, diffusers
