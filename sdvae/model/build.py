"""Building VAEs (AutoencoderKL or AutoencoderKLFlux2): presets with seeded weights, given weights, regrouped
norms, added depth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError
from sdvae.model.family import build
from sdvae.model.info import config_dict
from sdvae.model.presets import PRESETS

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    import torch

    from sdvae.model.family import VAE


def build_preset(name: str, seed: int = 0, image_channels: int = 0) -> VAE:
    """Build a preset with a seeded random initialisation (same seed, same weights, on any machine).

    Args:
        name: a key of :data:`PRESETS`.
        seed: seed for the weight initialisation.
        image_channels: if positive, the model's ``in_channels`` and ``out_channels`` (e.g. 1 for a
            grayscale, 4 for an RGBA VAE); 0 keeps the preset's (3, RGB).
    """
    import torch

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[name].config)
    if image_channels:
        config.update(in_channels=image_channels, out_channels=image_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build(config)
    return vae.eval()


def with_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> VAE:
    """A VAE of ``config`` (its class: :func:`sdvae.model.family.vae_class`) holding exactly ``state_dict``'s
    tensors (no random init first)."""
    import torch

    with torch.device("meta"):
        vae = build(config)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae


def regroup_norms(vae: VAE, groups: int) -> VAE:
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


def deepen(vae: VAE, layers_per_block: int, seed: int = 0) -> VAE:
    """The same function with more ResNet layers per block (a new model; ``vae`` is untouched).

    Every encoder and decoder block gets ResNet layers appended after its own until it has the new
    ``layers_per_block`` (diffusers' decoder blocks hold one more than that). Each new layer starts as
    the identity: its second convolution is zero, so ``x + conv2(...) = x`` exactly, and training adds
    capacity to a trained model instead of starting a larger one from scratch. Zero ``conv2`` still
    receives gradient on the first step; ``conv1`` and the norms take a seeded default init.

    Args:
        vae: any AutoencoderKL with ResNet blocks that keep their width after the first layer.
        layers_per_block: the new ``layers_per_block``; at least ``vae``'s (equal: the same weights).
        seed: seed for the new layers' non-zero parameters.

    Raises:
        UserError: ``layers_per_block`` is less than ``vae``'s (layers are never removed).
    """
    import torch

    old = vae.config.layers_per_block
    if layers_per_block < old:
        raise UserError(f"layers_per_block={layers_per_block} is less than the model's {old}: layers are "
                        "only added, never removed")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = build({**config_dict(vae), "layers_per_block": layers_per_block})
    # strict=False for the new layers only: every old layer keeps its name, so nothing is unexpected
    missing = out.load_state_dict(vae.state_dict(), strict=False).missing_keys
    layers = {key.rsplit(".", 2)[0] for key in missing}  # "decoder.up_blocks.0.resnets.2.conv1.weight" → layer
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name in layers:
            modules[name].conv2.weight.zero_()
            modules[name].conv2.bias.zero_()
    return out.train(vae.training)
