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


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 (moto's server mode, as s3fs's own tests use), one per session.

    Yields its endpoint URL. Credential checks are off (moto accepts any key) unless a test turns them on
    through ``/moto-api/reset-auth`` (see ``tests/storage/test_files.py``).
    """
    import logging
    import socket

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """A fresh, empty bucket on :func:`s3_server`: yields its ``s3://bucket`` URL, with the environment
    (endpoint, test credentials, region) pointing S3 clients at the server, and s3fs's cached clients cleared."""
    import uuid

    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
