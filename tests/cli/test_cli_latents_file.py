"""sdvae decode of a latents file (`sdvae encode`) with --preview (in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import make_photo
from sdvae.cli.main import main
from sdvae.latents.file import LATENTS_FORMAT, write_latents_file
from sdvae.model.presets import PRESETS


def test_latents_file_preview_only_colours(tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(make_photo(20, 12, seed=0)).save(photo)
    latents = tmp_path / "lat.safetensors"
    assert main(["encode", str(photo), "--model", "test", "-o", str(latents)]) == 0
    capsys.readouterr()
    # A non-SD model and no fitted map (latents files have none): arbitrary colours, said once on stderr.
    assert main(["decode", str(latents), "-o", str(tmp_path / "p"), "--preview-only"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("preview colours are arbitrary") == 1
    dest = tmp_path / "p" / "photo.00000.preview.png"
    assert captured.out.split() == [str(dest)] and Image.open(dest).size == (20, 12)  # the image's size

    # SD 1.x/2.x's latent space: SD's coefficients, no note (no model needed for --preview-only).
    z = torch.randn(4, 2, 3)
    sd_file = tmp_path / "sd.safetensors"
    write_latents_file({"00000.mean": z, "00000.logvar": torch.zeros_like(z)},
                       {"format": LATENTS_FORMAT, "model": "sd", "config_hash": "x", "scaled": False,
                        "config": dict(PRESETS["sd"].config),
                        "images": [{"key": "00000", "path": "a.png", "size": [24, 16], "notes": []}]}, sd_file)
    assert main(["decode", str(sd_file), "-o", str(tmp_path / "q"), "--preview-only"]) == 0
    assert "arbitrary" not in capsys.readouterr().err
    from sdvae.latents.preview import SD_LATENT_RGB

    rgb = torch.einsum("chw,ck->khw", z * 0.18215, torch.tensor(SD_LATENT_RGB))
    expected = ((rgb + 1) / 2).clamp(0, 1).repeat_interleave(8, -2).repeat_interleave(8, -1)
    got = np.asarray(Image.open(tmp_path / "q" / "a.00000.preview.png"), dtype=np.float32) / 255
    assert np.abs(got.transpose(2, 0, 1) - expected.numpy()).max() < 1 / 255 + 1e-6
    assert main(["decode", str(sd_file), "-o", str(tmp_path / "r"), "--row", "1"]) == 2
