"""tools/train.py on FLUX.2 VAEs (subprocess, the small FLUX.2-shaped model): a decoder-only fine-tune that
resumes bit-exact and keeps the encoder and BatchNorm statistics, and a run that trains the encoder and
measures the BatchNorm statistics into final/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image
from safetensors.torch import load_file

from flux2_helpers import small_flux2_folder
from helpers import REPO, kill_when_written, make_photo

pytestmark = pytest.mark.slow
TRAIN = str(REPO / "tools" / "train.py")
CONFIG = str(REPO / "configs" / "test.yaml")
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}, "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a folder of 12 photos, a small FLUX.2 VAE folder)."""
    root = tmp_path_factory.mktemp("flux2_train")
    images = root / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(make_photo(40 + i % 3, 36 + i % 5, seed=i)).save(images / f"{i:02d}.png")
    return images, small_flux2_folder(root / "vae")


def _cmd(setup: tuple[Path, Path], out: Path, *overrides: str) -> list[str]:
    images, model = setup
    return [sys.executable, TRAIN, CONFIG, f"--data.train={images}", f"--train.out={out}", f"--model.init={model}",
            "--log.with=none", *overrides]


def _run(cmd: list[str], code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "diffusion_pytorch_model.safetensors")


def test_decoder_fine_tune_resumes_bit_exact_and_keeps_encoder_and_statistics(setup, tmp_path: Path) -> None:
    common = ("--train.steps=8", "--train.checkpoint_every=4", "--train.val_every=8", "--model.train_encoder=false")
    straight = tmp_path / "straight"
    proc = _run(_cmd(setup, straight, *common))
    assert "encoder frozen, BatchNorm statistics kept from model.init" in proc.stdout + proc.stderr

    resumed = tmp_path / "resumed"
    kill_when_written(_cmd(setup, resumed, *common), resumed / "checkpoints" / "step-00000004", ENV)
    _run(_cmd(setup, resumed, *common))
    a, b = _final(straight), _final(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    init = load_file(setup[1] / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in init if k.startswith(("encoder.", "quant_conv.", "bn."))]
    assert "bn.running_mean" in frozen and all(torch.equal(a[k], init[k]) for k in frozen)
    assert any(not torch.equal(a[k], init[k]) for k in init if k.startswith("decoder."))
    vae = AutoencoderKLFlux2.from_pretrained(straight / "final")  # diffusers' own loader
    assert torch.equal(vae.bn.running_var, init["bn.running_var"])


def test_encoder_training_measures_batchnorm_statistics_into_final(setup, tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    proc = _run(_cmd(setup, out, "--train.steps=4", "--train.checkpoint_every=4", "--train.val_every=4"))
    assert "bn.running_mean (32 patchified channels, into the weights)" in proc.stdout + proc.stderr
    measured = json.loads((out / "metrics.json").read_text())["latent_stats"]
    assert measured["patchified"] and len(measured["channel_mean"]) == 32
    final = AutoencoderKLFlux2.from_pretrained(out / "final")
    torch.testing.assert_close(final.bn.running_mean, torch.tensor(measured["channel_mean"]))
    torch.testing.assert_close(final.bn.running_var, torch.tensor(measured["channel_std"]) ** 2)
    assert not torch.equal(final.bn.running_mean,
                           load_file(setup[1] / "diffusion_pytorch_model.safetensors")["bn.running_mean"])
    # data.resolution must allow the 2x2 patches: 40 (a multiple of 8, not of 16) is one line
    bad = _run(_cmd(setup, tmp_path / "bad", "--data.resolution=40", "--train.steps=1"), code=2)
    assert "data.resolution=40 is not a multiple of the downsampling factor 16" in bad.stderr
    assert not (tmp_path / "bad" / "final").exists()
