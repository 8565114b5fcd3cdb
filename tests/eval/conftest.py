"""Fixtures of the evaluation tests: a codec of the `test` preset and a small image folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from helpers import make_photo
from sdvae.codec.codec import Codec


@pytest.fixture
def codec(test_vae) -> Codec:
    return Codec(test_vae)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three photos of different sizes and one unreadable file."""
    root = tmp_path / "data"
    root.mkdir()
    for i, (w, h) in enumerate([(40, 32), (36, 44), (48, 33)]):
        Image.fromarray(make_photo(w, h, seed=i)).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    return root
