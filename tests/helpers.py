"""Helpers shared by the tests: generated images and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent  # the repository root


def make_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB uint8 array (gradients + blobs + a little noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * xx + 1) * 0.5 + 0.5, yy, np.cos(5 * (xx - yy)) * 0.5 + 0.5], -1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m sdvae.cli ARGS`` in a subprocess, as a user would run ``sdvae``."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdvae.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)
