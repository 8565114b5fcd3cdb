"""Latent scaling (the named functions) and the latents file format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdvae.errors import UserError
from sdvae.latents import read_latents_file, scale_latents, unscale_latents, write_latents_file
from sdvae.model import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_scale_unscale_inverse_and_formula(name: str) -> None:
    cfg = PRESETS[name].config
    z = torch.randn(2, cfg["latent_channels"], 5, 6)
    scaled = scale_latents(z, cfg)
    # diffusers pipelines: latents = (z - shift) * scaling_factor; decode(latents / scaling + shift)
    shift = cfg.get("shift_factor") or 0.0
    torch.testing.assert_close(scaled, (z - shift) * cfg["scaling_factor"])
    torch.testing.assert_close(unscale_latents(scaled, cfg), z)


def test_per_channel_mean_std_take_precedence() -> None:
    cfg = {"scaling_factor": 0.5, "shift_factor": 0.3, "latents_mean": [1.0, -1.0], "latents_std": [2.0, 4.0]}
    z = torch.randn(1, 2, 3, 3)
    scaled = scale_latents(z, cfg)
    torch.testing.assert_close(scaled[:, 0], (z[:, 0] - 1.0) * 0.5 / 2.0)
    torch.testing.assert_close(scaled[:, 1], (z[:, 1] + 1.0) * 0.5 / 4.0)
    torch.testing.assert_close(unscale_latents(scaled, cfg), z)


def test_latents_file_roundtrip(tmp_path: Path) -> None:
    tensors = {"00000.mean": torch.randn(4, 3, 5), "00000.logvar": torch.randn(4, 3, 5)}
    meta = {"format": "sdvae-latents/1", "config_hash": "abc", "scaled": False, "images": [{"size": [40, 24]}]}
    path = write_latents_file(tensors, meta, tmp_path / "sub" / "lat.safetensors")
    got, got_meta = read_latents_file(path)
    assert got_meta == meta
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert [p.name for p in path.parent.iterdir()] == ["lat.safetensors"]


def test_latents_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.safetensors"):
        read_latents_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match=r"junk\.safetensors"):
        read_latents_file(junk)
    with pytest.raises(UserError, match=r"\.safetensors"):
        write_latents_file({}, {}, tmp_path / "x.pt")
