"""What a loaded model is: its plain config, a hash of it, its downsampling factor, its facts."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from sdvae.model.family import is_flux2, patch_factor

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    import torch

    from sdvae.model.family import VAE


# The config keys that map a VAE's own latents to the diffusion space (none changes the latents).
SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def config_dict(vae: VAE) -> dict[str, Any]:
    """The model's config as plain JSON-able data, without diffusers' private ``_`` keys."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=list))


def config_hash(vae: VAE) -> str:
    """A short stable hash of the architecture + scaling config (identifies compatible latents)."""
    blob = json.dumps(config_dict(vae), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def downsample_factor(vae: VAE) -> int:
    """Spatial downsampling factor between pixels and (unscaled) latents (8 for SD-style VAEs and FLUX.2)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scaled_factor(vae: VAE) -> int:
    """Pixels per *scaled*-latent cell per side: 16 for FLUX.2 (f8, then 2×2 patchify), else 8.

    Image sides for scaled latents (buckets, crops of ``encode-dataset``) are multiples of this.
    """
    return downsample_factor(vae) * patch_factor(vae.config)


def normalization_summary(vae: VAE) -> str:
    """One line naming the latent normalisation in force (what :mod:`sdvae.latents.scaling` applies)."""
    cfg = vae.config
    if is_flux2(cfg):
        p = patch_factor(cfg)
        return (f"FLUX.2: {p}x{p} patchify to {p * p * cfg.latent_channels} channels, then (z - bn.running_mean) / "
                f"sqrt(bn.running_var + {cfg.batch_norm_eps:g})")
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        return "per channel: (z - latents_mean) * scaling_factor / latents_std"
    if cfg.get("shift_factor") is not None:
        return "(z - shift_factor) * scaling_factor"
    return "z * scaling_factor"


def describe(vae: VAE) -> dict[str, Any]:
    """Facts for ``sdvae info``: architecture, parameter counts, latent shape and scaling."""
    cfg = vae.config

    def count(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    flux2 = is_flux2(cfg)
    latent_shape = ([cfg.latent_channels * patch_factor(cfg) ** 2, f"H/{scaled_factor(vae)}", f"W/{scaled_factor(vae)}"]
                    if flux2 else [cfg.latent_channels, f"H/{downsample_factor(vae)}", f"W/{downsample_factor(vae)}"])
    return {
        "family": "FLUX.2 (AutoencoderKLFlux2)" if flux2 else "AutoencoderKL (SD, SDXL, SD3, FLUX.1)",
        "image_channels": [cfg.in_channels, cfg.out_channels],  # encoder input, decoder output
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "mid_block_attention": bool(cfg.get("mid_block_add_attention", True)),
        "latent_channels": cfg.latent_channels,
        "downsampling_factor": downsample_factor(vae),
        "quant_convs": [bool(cfg.get("use_quant_conv", True)), bool(cfg.get("use_post_quant_conv", True))],
        "latent_normalization": normalization_summary(vae),
        "scaled_latent_shape": latent_shape,
        "scaling_factor": cfg.get("scaling_factor"),
        "shift_factor": cfg.get("shift_factor"),
        "latents_mean": cfg.get("latents_mean"),
        "latents_std": cfg.get("latents_std"),
        "force_upcast": bool(cfg.get("force_upcast", not flux2)),
        "parameters": {
            "total": count(vae),
            "encoder": count(vae.encoder) + count(vae.quant_conv),
            "decoder": count(vae.decoder) + count(vae.post_quant_conv),
        },
        "dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
        "config_hash": config_hash(vae),
    }


def latent_space_hash(config: dict[str, Any]) -> str:
    """Hash of a VAE config without its scaling keys: what unscaled latents depend on."""
    blob = json.dumps({k: v for k, v in config.items() if k not in SCALING_KEYS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_hash(vae: torch.nn.Module) -> str:
    """Hash of the weights (two checkpoints of one architecture must not share a resumed output)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
