"""What a loaded model is: its plain config, a hash of it, its downsampling factor, its facts."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    import torch
    from diffusers import AutoencoderKL


# The config keys that map a VAE's own latents to the diffusion space (none changes the latents).
SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def config_dict(vae: AutoencoderKL) -> dict[str, Any]:
    """The model's config as plain JSON-able data, without diffusers' private ``_`` keys."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=list))


def config_hash(vae: AutoencoderKL) -> str:
    """A short stable hash of the architecture + scaling config (identifies compatible latents)."""
    blob = json.dumps(config_dict(vae), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def downsample_factor(vae: AutoencoderKL) -> int:
    """Spatial downsampling factor between pixels and latents (8 for SD-style VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def describe(vae: AutoencoderKL) -> dict[str, Any]:
    """Facts for ``sdvae info``: architecture, parameter counts, latent shape and scaling."""
    cfg = vae.config

    def count(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "mid_block_attention": bool(cfg.get("mid_block_add_attention", True)),
        "latent_channels": cfg.latent_channels,
        "downsampling_factor": downsample_factor(vae),
        "quant_convs": [bool(cfg.get("use_quant_conv", True)), bool(cfg.get("use_post_quant_conv", True))],
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.get("shift_factor"),
        "latents_mean": cfg.get("latents_mean"),
        "latents_std": cfg.get("latents_std"),
        "force_upcast": bool(cfg.get("force_upcast", True)),
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
