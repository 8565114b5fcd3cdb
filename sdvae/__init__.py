"""sdvae: Stable-Diffusion-style KL image VAEs built on ``diffusers.AutoencoderKL``.

``import sdvae`` stays light: torch and diffusers load when a submodule that needs them is imported
(the names below are resolved on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public API: name -> module that defines it.
_EXPORTS = {
    "load_vae": "sdvae.model.load",
    "save_diffusers": "sdvae.model.save",
    "build_preset": "sdvae.model.build",
    "PRESETS": "sdvae.model.presets",
    "Codec": "sdvae.codec.codec",
    "scale_latents": "sdvae.latents.scaling",
    "unscale_latents": "sdvae.latents.scaling",
    "latent_normalization": "sdvae.latents.scaling",
    "LatentDataset": "sdvae.latents.dataset",
    "LatentStream": "sdvae.latents.stream",
    "BucketBatchSampler": "sdvae.latents.bucket_sampler",
    "UserError": "sdvae.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sdvae' has no attribute {name!r}")
