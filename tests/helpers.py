"""Helpers shared by the tests: generated images and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent  # the repository root


def make_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB uint8 array (gradients + blobs + a little noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * xx + 1) * 0.5 + 0.5, yy, np.cos(5 * (xx - yy)) * 0.5 + 0.5], -1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def uniform_images(seed: int = 0, batch: int = 2, size: int = 32) -> torch.Tensor:
    """(batch, 3, size, size) uniform noise images in [-1, 1] from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def seeded_train_vae(seed: int = 0) -> torch.nn.Module:
    """The micro ``test`` preset with weights drawn from ``seed``, in train mode (the global RNG left as it was)."""
    from sdvae.model.build import build_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_preset("test").train()


def jpeg_bytes(seed: int, width: int = 40, height: int = 36) -> bytes:
    """A ``make_photo`` image as JPEG bytes (quality 90)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(make_photo(width, height, seed=seed)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar file holding ``members`` (name, content) in order, as img2dataset writes shards."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m sdvae.cli ARGS`` in a subprocess, as a user would run ``sdvae``."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdvae.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def save_photo(path: Path, width: int, height: int, seed: int) -> None:
    """Write a ``make_photo`` PNG at ``path`` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_photo(width, height, seed)).save(path)


def encode_small(src: Path | str, out: Path, **kw) -> dict:
    """``run_encode`` with the `test` preset, fp32 and small shards (keyword arguments override).

    fp32 explicitly: the default ``auto`` means bf16 on CPUs with native bf16, and tests compare values.
    """
    from sdvae.latents.export import EncodeOptions, run_encode

    kw = {"resolution": 32, "shard_size": 4, "batch_size": 3, "progress": False, "dtype": "fp32", **kw}
    return run_encode(EncodeOptions(src=str(src), out=str(out), model="test", **kw))


def dataset_rows(out: Path) -> list[dict]:
    """Every row of an encode-dataset output, as dicts."""
    import datasets

    return list(datasets.load_from_disk(str(out)))


def stored_latent(row: dict, column: str, dtype: str = "fp32") -> torch.Tensor:
    """A stored latent column of a row as a (C, h, w) tensor."""
    from sdvae.latents.format import stored_to_tensor

    return stored_to_tensor(row[column], dtype, row["shape"])


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each finished shard (unchanged means not rewritten)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "data").glob("shard-*.arrow"))}


def load_tool(name: str):
    """Import ``tools/NAME.py`` (scripts are not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_when_written(cmd: list[str], marker: Path, env: dict[str, str], timeout: float = 300) -> None:
    """Start ``cmd`` (from the repository root), SIGKILL it as soon as ``marker`` exists, and check it was
    interrupted mid-way (the marker written, the run not finished: no ``final/`` beside the marker's run)."""
    import time

    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    run = marker.parent.parent  # RUN/checkpoints/step-N
    assert marker.exists() and not (run / "final").exists(), "the run was not interrupted mid-way"
