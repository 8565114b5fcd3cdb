"""A small FLUX.2-shaped VAE (diffusers' AutoencoderKLFlux2) for fast tests, and diffusers' Flux2Pipeline.

The small config keeps FLUX.2's structure (quant convs, mid-block attention, f8, BatchNorm over the 2×2
patches) at a size that runs in milliseconds; its BatchNorm statistics are seeded random values, so a
normalisation that ignored them would show.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import torch

from sdvae.model.family import build
from sdvae.model.presets import PRESETS
from sdvae.model.save import save_diffusers

SMALL_FLUX2 = {**{k: v for k, v in PRESETS["flux2"].config.items()},
               "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
               "latent_channels": 8, "sample_size": 64}


def small_flux2(seed: int = 0):
    """The small FLUX.2 VAE with seeded weights and seeded BatchNorm statistics (mean ≠ 0, var ≠ 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build(SMALL_FLUX2).eval()
        with torch.no_grad():
            vae.bn.running_mean.normal_(0.0, 0.5)
            vae.bn.running_var.uniform_(0.3, 3.0)
            vae.bn.num_batches_tracked.fill_(11)
    return vae


def small_flux2_folder(path: Path, seed: int = 0) -> Path:
    """The small FLUX.2 VAE saved as a diffusers folder."""
    return save_diffusers(small_flux2(seed), path)


def flux2_pipeline_class() -> type:
    """diffusers' ``Flux2Pipeline`` class, importable without ``transformers``.

    The pipeline module imports its text encoder's classes from ``transformers``, which this project does
    not install (and no FLUX.2 text encoder can be made offline). A stand-in module with those two names
    lets the module load; the pipeline is then built with ``text_encoder``/``tokenizer``/``transformer``
    None, which is enough for its VAE code (``_encode_vae_image``, ``_patchify_latents``, ...).
    """
    import diffusers  # noqa: F401  (diffusers checks for transformers once, at its own import)
    import diffusers.loaders as loaders
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

    loaders.Flux2LoraLoaderMixin = Flux2LoraLoaderMixin  # hidden by diffusers when transformers is missing
    stubbed = "transformers" not in sys.modules
    if stubbed:  # only while the pipeline module imports: other tests must not see a fake transformers
        stub = types.ModuleType("transformers")
        stub.__spec__ = importlib.machinery.ModuleSpec("transformers", None)
        stub.AutoProcessor = stub.Mistral3ForConditionalGeneration = object
        sys.modules["transformers"] = stub
    try:
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    finally:
        if stubbed:
            del sys.modules["transformers"]
    return Flux2Pipeline
