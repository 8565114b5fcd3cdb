"""The one registry of named VAE architectures (AutoencoderKL; FLUX.2's AutoencoderKLFlux2) and their scaling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The embedded checkpoint: real trained weights shipped inside the package (package data, so editable and
# wheel installs both have it; the repository's checkpoints/sdvae-tiny-f8c4 is a symlink to this folder).
# The default model of every command; its model card is the folder's README.md.
EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "sdvae-tiny-f8c4"

_SD_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
}


@dataclass(frozen=True)
class Preset:
    """A named VAE architecture with its latent scaling.

    Attributes:
        description: one line for ``sdvae info`` and ``--help``.
        config: keyword arguments for ``diffusers.AutoencoderKL``, or for ``diffusers.AutoencoderKLFlux2``
            when it has FLUX.2's BatchNorm keys (:func:`sdvae.model.family.is_flux2`).
    """

    description: str
    config: dict[str, Any] = field(default_factory=dict)


# The one preset registry. CLI choices and tests iterate over it.
PRESETS: dict[str, Preset] = {
    "sd": Preset(
        "Stable Diffusion 1.x/2.x VAE (kl-f8, 4 latent channels)",
        {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    ),
    "sdxl": Preset(
        "SDXL VAE (SD architecture, scaling 0.13025, runs in fp32 by default)",
        {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
         "force_upcast": True},
    ),
    "sd3": Preset(
        "Stable Diffusion 3 VAE (16 latent channels, no quant convs)",
        {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
         "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
    ),
    "flux": Preset(
        "FLUX.1 VAE (16 latent channels, no quant convs)",
        {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
         "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    ),
    "flux2": Preset(
        "FLUX.2 VAE (32 latent channels; 2x2 patchify + BatchNorm statistics to 128 channels at f16)",
        {**_SD_BLOCKS, "latent_channels": 32, "sample_size": 1024, "batch_norm_eps": 1e-4,
         "batch_norm_momentum": 0.1, "patch_size": [2, 2]},
    ),
    "tiny": Preset(
        "small f8c4 VAE that trains on 2 CPU cores (the embedded checkpoint's, with 1 of its 2 layers per block)",
        {**_SD_BLOCKS, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "latent_channels": 4,
         "sample_size": 256, "scaling_factor": 0.18215, "force_upcast": False,
         # No mid-block attention and 8 norm groups: why, measured, is in the model card
         # (checkpoints/sdvae-tiny-f8c4/README.md).
         "mid_block_add_attention": False, "norm_num_groups": 8},
    ),
    "test": Preset(
        "micro f8c4 VAE for unit tests (with mid-block attention)",
        {**_SD_BLOCKS, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "latent_channels": 4, "sample_size": 64, "scaling_factor": 0.5,
         "force_upcast": False},
    ),
}
