"""Atomic file and folder writes: a destination is either the complete old content or the complete new.

Everything ``sdvae`` writes for the user goes through these two context managers: the content is
written under a temporary name in the destination's folder (same filesystem, so the final
``os.replace`` is atomic), then given the permissions the user's umask gives any new file
(``tempfile`` and safetensors create 0600 files, which would otherwise survive the rename).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dest``, on error it is removed.

    Args:
        dest: final file path (its folder is created if missing).
    """
    final = Path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:  # the rename must not become visible before the data is on disk
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``dest`` (two renames), on error it is removed.

    Args:
        dest: final folder path. An existing ``dest`` is replaced: check before calling if that is
            not wanted.
    """
    final = Path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        if final.exists():
            old = _temp_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
