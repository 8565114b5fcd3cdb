"""Atomic file and folder writes: a destination is either the complete old content or the complete new.

A write the file system refuses (disk full, read-only, quota: any :class:`OSError`) becomes one
:class:`sdvae.errors.WriteError` naming the destination, with no temporary file or folder left behind.

Everything ``sdvae`` writes for the user goes through these two context managers (JSON through
:func:`write_json`, which uses the first): the content is
written under a temporary name in the destination's folder (same filesystem, so the final
``os.replace`` is atomic), then given the permissions the user's umask gives any new file
(``tempfile`` and safetensors create 0600 files, which would otherwise survive the rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdvae.errors import UserError, WriteError


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

    Raises:
        WriteError: the file system refused the write (also for an OSError raised while writing ``tmp``).
    """
    final = Path(dest)
    tmp = _temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:  # the rename must not become visible before the data is on disk
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except UserError:
        raise
    except OSError as err:
        raise WriteError(final, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``dest`` (two renames), on error it is removed.

    If the second rename fails, the previous ``dest`` is renamed back: it is never lost.

    Args:
        dest: final folder path. An existing ``dest`` is replaced: check before calling if that is
            not wanted.

    Raises:
        WriteError: the file system refused the write (also for an OSError raised while filling ``tmp``).
    """
    final = Path(dest)
    tmp = _temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        if final.exists():
            old = _temp_name(final)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError as err:
                try:
                    os.replace(old, final)  # put the previous content back before reporting
                except OSError:
                    raise WriteError(final, err, f"its previous content is kept in {old}") from err
                raise
            with contextlib.suppress(OSError):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, final)
    except UserError:
        raise
    except OSError as err:
        raise WriteError(final, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(dest: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as indented JSON with a final newline, atomically (:func:`atomic_file`).

    Raises:
        WriteError: the file system refused the write.
    """
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
