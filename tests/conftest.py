"""Shared fixtures: tiny models and generated images (tests never read ../shared or the network)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from helpers import make_photo, save_photo

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


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three photos of different sizes and one unreadable file."""
    root = tmp_path / "data"
    root.mkdir()
    for i, (w, h) in enumerate([(40, 32), (36, 44), (48, 33)]):
        Image.fromarray(make_photo(w, h, seed=i)).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """10 readable images in nested folders (varied sizes) and 2 unreadable ones."""
    root = tmp_path / "imgs"
    for i in range(10):
        save_photo(root / ("sub/" if i % 3 == 0 else "") / f"im{i:02d}.png", 36 + 3 * i, 34 + 2 * (i % 4), seed=i)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "sub" / "empty.jpg").write_bytes(b"")
    return root



@pytest.fixture
def empty_hub(tmp_path: Path):
    """torch hub pointed at an empty folder, and any download attempt made to fail loudly."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    with mock.patch("torch.hub.download_url_to_file", no_download), \
            mock.patch("torch.hub.load_state_dict_from_url", no_download):
        yield tmp_path / "hub"
    torch.hub.set_dir(previous)
