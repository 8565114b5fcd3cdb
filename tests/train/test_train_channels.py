"""Training grayscale (1-channel) and RGBA (4-channel) VAEs: data, losses, config, and tools/train.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, make_photo
from sdvae.errors import UserError
from sdvae.images.channels import rgb_view
from sdvae.images.load import load_image
from sdvae.images.sources import open_source
from sdvae.metrics.lpips import build_lpips, lpips_distance
from sdvae.model.build import build_preset
from sdvae.model.load import load_vae
from sdvae.model.save import save_diffusers
from sdvae.train.config import LossConfig, load_config
from sdvae.train.datasets import TrainDataset, ValDataset
from sdvae.train.losses import VAELoss


@pytest.fixture(scope="module")
def rgba_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 RGBA photos (left quarter transparent) of a few sizes."""
    root = tmp_path_factory.mktemp("rgba_images")
    for i in range(12):
        photo = make_photo(40 + i % 3, 36 + i % 2, seed=i)
        alpha = np.full((*photo.shape[:2], 1), 255, np.uint8)
        alpha[:, :10] = 0
        Image.fromarray(np.concatenate([photo, alpha], axis=2), "RGBA").save(root / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("channels", [1, 4])
def test_datasets_yield_the_model_channels(rgba_folder: Path, channels: int) -> None:
    source = open_source(str(rgba_folder))
    train = TrainDataset(source, resolution=32, seed=1, channels=channels, color_cast=1.0)
    item = train[(0, 2)]
    assert item["pixels"].shape == (channels, 32, 32) and not item["skipped"]
    val = ValDataset(source, resolution=32, channels=channels)
    assert val[0]["pixels"].shape == (channels, 32, 32)
    plain = TrainDataset(source, resolution=32, seed=1, channels=channels, flip=False, crop="center")[(0, 0)]
    expected = load_image(rgba_folder / "00.png", channels=channels).tensor[0]
    assert torch.equal(plain["pixels"], expected[:, 2:34, 4:36])


def test_colour_cast_keeps_alpha_and_shifts_grey() -> None:
    source = open_source(str(REPO / "assets"))  # any source: cast() is a pure function of the key
    rgba = torch.rand(4, 8, 8) * 2 - 1
    cast = TrainDataset(source, resolution=8, color_cast=1.0, channels=4).cast(rgba, 0, 3)
    assert torch.equal(cast[3], rgba[3]) and not torch.equal(cast[:3], rgba[:3])
    rgb = TrainDataset(source, resolution=8, color_cast=1.0).cast(rgba[:3].clone(), 0, 3)
    assert torch.equal(cast[:3], rgb)  # the colour channels get exactly the RGB cast
    grey = torch.zeros(1, 8, 8)
    shifted = TrainDataset(source, resolution=8, color_cast=1.0, channels=1).cast(grey, 0, 3)
    assert shifted.shape == (1, 8, 8) and shifted.unique().numel() == 1 and shifted[0, 0, 0] != 0


@pytest.mark.parametrize("channels", [1, 4])
def test_losses_take_the_model_channels(channels: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lpips_net = build_lpips("squeeze", random_backbone=True)
    cfg = LossConfig(lpips_weight=1.0, disc_weight=0.5, disc_start=0, disc_layers=2, kl_weight=1e-6)
    loss_fn = VAELoss(cfg, lpips_model=lpips_net, disc_ndf=8, image_channels=channels)
    vae = build_preset("test", image_channels=channels).train()
    images = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    post = vae.encode(images).latent_dist
    recon = vae.decode(post.mean).sample
    total, logs = loss_fn.generator_loss(images, recon, post.mean, post.logvar, step=0,
                                         last_layer=vae.decoder.conv_out.weight)
    total.backward()
    assert torch.isfinite(total) and vae.decoder.conv_out.weight.grad is not None
    expected = lpips_distance(lpips_net, rgb_view(images), rgb_view(recon)).mean()
    assert logs["lpips"] == pytest.approx(expected.item(), rel=1e-5)  # LPIPS on the RGB view
    d_loss, _ = loss_fn.discriminator_loss(images, recon, step=0)
    d_loss.backward()
    assert torch.isfinite(d_loss)


def test_image_channels_key_builds_presets_and_checks_folders(tmp_path: Path) -> None:
    assert load_config(None).model.image_channels == 0  # the init's own
    with pytest.raises(UserError, match=r"model.image_channels: must be 0 .* got 2"):
        load_config(None, ["--model.image_channels=2"])
    vae = load_vae("test", image_channels=4)
    assert (vae.config.in_channels, vae.config.out_channels) == (4, 4)
    save_diffusers(build_preset("test", image_channels=1), tmp_path / "grey")
    assert load_vae(tmp_path / "grey", image_channels=1).config.in_channels == 1
    with pytest.raises(UserError, match="has 1 image channels, not 4"):
        load_vae(tmp_path / "grey", image_channels=4)


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 4])
def test_train_script_trains_and_exports(channels: int, rgba_folder: Path, tmp_path: Path) -> None:
    """A few steps of tools/train.py from the `test` preset with every term on (LPIPS from a random backbone file,
    the PatchGAN from step 0, the validation grid to TensorBoard); the exported model has the channels."""
    from torchvision.models import squeezenet1_1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(squeezenet1_1(weights=None).state_dict(), tmp_path / "squeeze.pth")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "configs" / "test.yaml"),
         f"--data.train={rgba_folder}", f"--train.out={out}", f"--model.image_channels={channels}",
         "--train.steps=3", "--train.checkpoint_every=3", "--train.val_every=3", "--train.batch_size=2",
         "--loss.lpips_weight=1.0", "--loss.lpips_net=squeeze", f"--loss.lpips_weights={tmp_path / 'squeeze.pth'}",
         "--loss.disc_weight=0.5", "--loss.disc_start=0", "--loss.disc_layers=2"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vae = load_vae(out / "final")
    assert (vae.config.in_channels, vae.config.out_channels) == (channels, channels)
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["psnr"]) and metrics["latent_stats"]["written"]["scaling_factor"] > 0
    with Image.open(out / "samples" / "step-00000003.png") as grid:
        assert grid.mode == ("RGBA" if channels == 4 else "RGB")  # torchvision shows grayscale as grey RGB
