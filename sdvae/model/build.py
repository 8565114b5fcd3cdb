"""Building AutoencoderKL instances: presets with seeded weights, given weights, regrouped norms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError
from sdvae.model.info import config_dict
from sdvae.model.presets import PRESETS

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    import torch
    from diffusers import AutoencoderKL


def build_preset(name: str, seed: int = 0) -> AutoencoderKL:
    """Build a preset with a seeded random initialisation (same seed, same weights, on any machine).

    Args:
        name: a key of :data:`PRESETS`.
        seed: seed for the weight initialisation.
    """
    import torch
    from diffusers import AutoencoderKL

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**PRESETS[name].config)
    return vae.eval()


def with_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> AutoencoderKL:
    """An AutoencoderKL of ``config`` holding exactly ``state_dict``'s tensors (no random init first)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae


def regroup_norms(vae: AutoencoderKL, groups: int) -> AutoencoderKL:
    """The same weights with every GroupNorm using ``groups`` groups (a new model; ``vae`` is untouched).

    GroupNorm's affine parameters are per channel, so the weights fit any group count that divides
    every width. Fewer groups let a layer keep its channels' relative means: with one channel per
    group (the ``tiny`` preset's 32 groups on its 32-channel full-resolution layers) the decoder's last
    normalisation removes each channel's image-wide mean, and an image's overall colour survives only
    in the shape of the feature distributions. The function changes, so fine-tune after regrouping.

    Args:
        vae: any AutoencoderKL.
        groups: the new ``norm_num_groups``.

    Raises:
        UserError: ``groups`` does not divide every entry of ``block_out_channels``.
    """
    widths = list(vae.config.block_out_channels)
    if groups <= 0 or any(w % groups for w in widths):
        raise UserError(f"norm_num_groups={groups} must be positive and divide every block width {widths}")
    weights = {k: v.clone() for k, v in vae.state_dict().items()}  # clones: training `out` leaves `vae` as it is
    return with_weights({**config_dict(vae), "norm_num_groups": groups}, weights).train(vae.training)
