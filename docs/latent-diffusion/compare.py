"""Figures of docs/latent-diffusion: decoded dataset latents | diffusion samples | prior samples, and the stats table.

    python docs/latent-diffusion/compare.py LATENTS RUN PRIOR_GRID OUT_DIR

LATENTS: the encode-dataset output the run trained on; RUN: tools/train_latent_diffusion.py's folder;
PRIOR_GRID: ``sdvae sample -n 64 --size 64 --seed 0`` of the same VAE. Writes OUT_DIR/comparison.jpg
and OUT_DIR/numbers.json (dataset vs generated vs prior per-channel statistics, held-out losses).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from sdvae.codec.codec import Codec
from sdvae.images.compose import image_grid, side_by_side
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.stats import compute_latent_stats
from sdvae.model.load import load_vae


def main(latents: str, run: str, prior_grid: str, out_dir: str) -> None:
    out = Path(out_dir)
    data = LatentDataset(latents, scaled=False, sample=False)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64].tolist()
    z = torch.stack([data.unscaled(i)[0] for i in rows])
    codec = Codec(load_vae(data.meta["model"]))
    real = image_grid(codec.decode(z), nrow=8)
    pair = side_by_side(real, Image.open(Path(run) / "samples.png"),
                        ("64 dataset latents (posterior means), decoded", "64 latent-diffusion samples, decoded"))
    grid = side_by_side(pair, Image.open(prior_grid), ("", "64 prior samples (sdvae sample), decoded"))
    grid.save(out / "comparison.jpg", quality=88)

    report = json.loads((Path(run) / "report.json").read_text())
    stats = compute_latent_stats(latents)
    scaling = data.meta["scaling"]
    channels = len(stats.channel_mean)
    # `sdvae sample`: z ~ N(0, I) in the scaled space, unscaled: mean = shift, std = 1/scaling_factor.
    prior = {"channel_mean": [scaling["shift_factor"] or 0.0] * channels,
             "channel_std": [1 / scaling["scaling_factor"]] * channels}
    numbers = {"dataset (latent-stats, posterior)": {"channel_mean": stats.channel_mean,
                                                     "channel_std": stats.channel_std, "rows": stats.rows},
               "generated (latent diffusion)": report["generated"], "prior (sdvae sample)": prior,
               "held_out_loss": report["held_out_loss"], "run": {k: report[k] for k in (
                   "steps", "preset", "batch_size", "parameters", "train_rows", "held_out_rows", "latent_shape")}}
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
