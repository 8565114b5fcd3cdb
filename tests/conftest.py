"""Shared fixtures: tiny models and generated images (tests never read ../shared or the network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_photo

# Any accidental network access fails at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def test_vae():
    """The micro `test` preset (seeded, with mid-block attention)."""
    from sdvae.model.build import build_preset

    return build_preset("test")


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 45×37 RGB PNG (sides deliberately not multiples of 8)."""
    path = tmp_path / "photo.png"
    Image.fromarray(make_photo(45, 37)).save(path)
    return path
