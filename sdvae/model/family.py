"""Which diffusers class a VAE config belongs to: ``AutoencoderKL`` or FLUX.2's ``AutoencoderKLFlux2``.

Both have the same LDM encoder/decoder and quant convs; ``AutoencoderKLFlux2`` (a sibling class, not a
subclass) adds a ``bn`` BatchNorm whose running statistics normalise the 2×2-patchified latents, and
its config has ``batch_norm_eps``/``batch_norm_momentum``/``patch_size`` instead of a
``scaling_factor``. Every place that builds, loads or checks a VAE asks this module, so the rule is in
one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # diffusers loads lazily so importing this module stays cheap
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    VAE = AutoencoderKL | AutoencoderKLFlux2

FLUX2_CLASS = "AutoencoderKLFlux2"
# Config keys only AutoencoderKLFlux2 has (any one of them marks a FLUX.2 config).
FLUX2_KEYS = ("batch_norm_eps", "batch_norm_momentum", "patch_size")
# The normalisation constants of FLUX.2's release (``black-forest-labs/flux2`` ``src/flux2/autoencoder.py``).
FLUX2_DEFAULTS = {"batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": [2, 2]}
# Keys of AutoencoderKL configs that AutoencoderKLFlux2 does not take.
_KL_ONLY_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


def is_flux2(config: Mapping[str, Any]) -> bool:
    """True for a FLUX.2 (``AutoencoderKLFlux2``) config: its class name or one of its own keys."""
    return config.get("_class_name") == FLUX2_CLASS or any(k in config for k in FLUX2_KEYS)


def family(config: Mapping[str, Any]) -> str:
    """``flux2`` for an AutoencoderKLFlux2 config, else ``kl`` (every AutoencoderKL: SD, SDXL, SD3, FLUX.1)."""
    return "flux2" if is_flux2(config) else "kl"


def vae_class(config: Mapping[str, Any]) -> type:
    """The diffusers class of a config: ``AutoencoderKLFlux2`` or ``AutoencoderKL``."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    return AutoencoderKLFlux2 if is_flux2(config) else AutoencoderKL


def vae_classes() -> tuple[type, ...]:
    """Every VAE class sdvae handles, for ``isinstance`` checks."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    return (AutoencoderKL, AutoencoderKLFlux2)


def class_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` reduced to what its class's constructor takes (FLUX.2 has no scaling keys)."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    if is_flux2(config):
        out = {k: v for k, v in out.items() if k not in _KL_ONLY_KEYS}
    return out


def build(config: Mapping[str, Any]) -> VAE:
    """A new model of ``config``'s class (random init; call under ``torch.device('meta')`` to skip it)."""
    return vae_class(config)(**class_kwargs(config))


def patch_factor(config: Mapping[str, Any]) -> int:
    """How many latent cells one scaled-latent cell spans per side: 2 for FLUX.2's 2×2 patchify, else 1."""
    if not is_flux2(config):
        return 1
    patch = config.get("patch_size") or FLUX2_DEFAULTS["patch_size"]
    return int(patch[0])
