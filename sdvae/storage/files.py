"""File I/O on refs (local paths or fsspec URLs) with atomic writes and one-line errors.

Local refs use the operating system directly (atomic writes through :mod:`sdvae.atomic`); URLs go through
fsspec (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``...), which takes credentials and endpoint from the
usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``HF_TOKEN``...). A remote write is one request carrying the whole object, so the object appears complete or
not at all. Every failure becomes :func:`sdvae.storage.errors.translate`'s one-line :class:`UserError`.

fsspec is imported on first use only: ``import sdvae`` stays light.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import json
import os
import re
from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError, first_line
from sdvae.storage.errors import translate
from sdvae.storage.urls import basename, is_url, join, local_path, parent, redact, scheme, strip_query

if TYPE_CHECKING:
    import fsspec

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = set("*?[")
_SINGLE_PUT = 5 * 2**30  # S3's largest single PUT


def filesystem(ref: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system serving ``ref`` and the path inside it (:func:`fsspec.core.url_to_fs`).

    Raises:
        UserError: fsspec or the protocol's package (s3fs, gcsfs...) is not installed, or an unknown protocol.
    """
    proto = scheme(ref)
    try:
        import fsspec.core
    except ImportError:
        raise UserError(f"{redact(ref)}: reading {proto}:// needs fsspec: pip install 'sdvae[remote]'") from None
    try:
        return fsspec.core.url_to_fs(ref)
    except ImportError:
        from fsspec.registry import known_implementations

        package = known_implementations.get(proto, {}).get("class", proto).split(".")[0]
        install = "'sdvae[remote]'" if package == "s3fs" else package.replace("_", "-")
        raise UserError(f"{redact(ref)}: reading {proto}:// needs {package}: pip install {install}") from None
    except ValueError as err:
        if "protocol" in str(err).lower():
            raise UserError(f"{redact(ref)}: unknown protocol {proto}:// ({first_line(err)})") from None
        raise translate(ref, err) from None
    except Exception as err:
        raise translate(ref, err) from None


def exists(ref: str) -> bool:
    """Whether ``ref`` names an existing file or folder (remote listings are re-read, never cached)."""
    if not is_url(ref):
        return os.path.exists(local_path(ref))
    fs, path = filesystem(ref)
    try:
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    except Exception as err:
        raise translate(ref, err) from None


def read_bytes(ref: str) -> bytes:
    """The whole content of file ``ref``."""
    try:
        if not is_url(ref):
            with open(local_path(ref), "rb") as f:
                return f.read()
        fs, path = filesystem(ref)
        return bytes(fs.cat_file(path))
    except Exception as err:
        raise translate(ref, err) from None


def read_json(ref: str) -> Any:
    """The JSON value stored in file ``ref``.

    Raises:
        UserError: unreadable file or invalid JSON.
    """
    data = read_bytes(ref)
    try:
        return json.loads(data)
    except ValueError as err:
        raise UserError(f"{redact(ref)}: not valid JSON ({first_line(err)})") from None


def write_bytes(ref: str, data: bytes) -> None:
    """Write ``data`` to file ``ref`` atomically: readers see the old content or the new, never a part.

    Local: :func:`sdvae.atomic.atomic_file` (temporary file, fsync, rename; parent folders created).
    Remote: one PUT of the whole object (``fs.pipe_file``), which the store publishes complete or not at all.
    """
    if not is_url(ref):
        from sdvae.atomic import atomic_file

        with atomic_file(local_path(ref)) as tmp:
            tmp.write_bytes(data)
        return
    _put(ref, data)


def _put(ref: str, data: bytes) -> None:
    """One PUT of the whole object ``ref`` (remote refs)."""
    fs, path = filesystem(ref)
    kwargs = {"chunksize": _SINGLE_PUT} if scheme(ref) in ("s3", "s3a") else {}  # s3fs: single PUT up to 5 GiB
    try:
        fs.pipe_file(path, bytes(data), **kwargs)
    except Exception as err:
        raise translate(ref, err) from None


def write_json(ref: str, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as indented JSON with a final newline (as :func:`sdvae.atomic.write_json`), atomically."""
    if not is_url(ref):
        from sdvae.atomic import write_json as write_local

        write_local(local_path(ref), obj, indent=indent)
        return
    _put(ref, (json.dumps(obj, indent=indent) + "\n").encode())


def list_files(folder: str) -> dict[str, int]:
    """``{name: size}`` of the files directly in ``folder`` (not sub-folders); ``{}`` when it does not exist."""
    if not is_url(folder):
        try:
            with os.scandir(local_path(folder)) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as err:
            raise translate(folder, err) from None
    fs, path = filesystem(folder)
    try:
        fs.invalidate_cache(path)  # other writers may have added files since the last listing
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as err:
        raise translate(folder, err) from None
    prefix = path.rstrip("/")
    return {basename(e["name"]): int(e.get("size") or 0) for e in entries
            if e.get("type") == "file" and e["name"].rstrip("/") != prefix}


def remove(ref: str) -> None:
    """Delete file ``ref``; a missing file is fine."""
    try:
        if not is_url(ref):
            with contextlib.suppress(FileNotFoundError):
                os.remove(local_path(ref))
            return
        fs, path = filesystem(ref)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
    except Exception as err:
        raise translate(ref, err) from None


class _Reader(io.RawIOBase):
    """A remote file object whose failures (network, credentials) become :func:`translate`'s UserError."""

    def __init__(self, ref: str, raw: Any):
        super().__init__()
        self._ref, self._raw = ref, raw

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._raw, method)(*args)
        except Exception as err:
            raise translate(self._ref, err) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return bytes(self._call("read", -1 if size is None else size))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._call("seek", offset, whence))

    def tell(self) -> int:
        return int(self._call("tell"))

    @property
    def size(self) -> int:
        return int(self._raw.size)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._raw.close()
        super().close()


def open_read(ref: str) -> io.RawIOBase | io.BufferedReader:
    """A binary, seekable file object reading ``ref`` (a context manager); remote reads stream in blocks."""
    try:
        if not is_url(ref):
            return open(local_path(ref), "rb")  # the caller closes it
        fs, path = filesystem(ref)
        return _Reader(ref, fs.open(path, "rb"))
    except Exception as err:
        raise translate(ref, err) from None


def size(ref: str) -> int:
    """The size of file ``ref`` in bytes."""
    try:
        if not is_url(ref):
            return os.path.getsize(local_path(ref))
        fs, path = filesystem(ref)
        return int(fs.size(path))
    except Exception as err:
        raise translate(ref, err) from None


def expand(ref: str, *, what: str = "file") -> list[str]:
    """The files a reference names, in order, each checked to exist.

    Forms (local or URL): a single file; a brace range ``data/{00000..00099}.tar`` (zero padding kept); a
    glob (``*``, ``?``, ``[``; sorted; files only); a ``.txt`` list file (one ref per line, ``#`` comments,
    relative entries resolved against the list's folder or URL). Local refs come back with ``~`` expanded
    and ``file://`` removed.

    Args:
        ref: the reference.
        what: what the files are, for messages (``"tar shard"`` → ``"no such tar shard"``).

    Raises:
        UserError: a missing file (the first one, and how many), a pattern matching nothing, an empty list.
    """
    where = redact(ref)
    pattern = strip_query(ref)
    if basename(pattern).lower().endswith(".txt") and not _GLOB_CHARS & set(pattern) and not _BRACE.search(ref):
        refs = read_list(ref)
        if not refs:
            raise UserError(f"{where}: the list names no {what}")
    elif match := _BRACE.search(ref):
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") else 0
        refs = [ref[:match.start()] + str(n).zfill(width) + ref[match.end():] for n in range(int(lo), int(hi) + 1)]
        if not is_url(ref):
            refs = [local_path(r) for r in refs]
    elif _GLOB_CHARS & set(pattern):
        refs = _glob(ref)
        if not refs:
            raise UserError(f"{where}: no {what}s match this pattern")
        return refs
    else:
        refs = [ref if is_url(ref) else local_path(ref)]
    missing = _missing(refs)
    if missing:
        count = f" ({len(missing)} of {len(refs)} missing)" if len(refs) > 1 else ""
        raise UserError(f"{redact(missing[0])}: no such {what}{count}")
    return refs


def read_list(ref: str) -> list[str]:
    """The refs listed in text file ``ref``: one a line, blank lines and ``#`` comments skipped, relative entries
    resolved against the list's folder or URL (not checked to exist)."""
    text = read_bytes(ref).decode("utf-8", errors="replace")
    entries = [line.strip() for line in text.splitlines()]
    base = parent(ref) if is_url(ref) else os.path.dirname(local_path(ref))
    return [_resolve(base, e) for e in entries if e and not e.startswith("#")]


def _resolve(base: str, entry: str) -> str:
    """A list entry as a ref: URLs and absolute paths as they are, others relative to the list's folder."""
    if is_url(entry):
        return entry
    path = local_path(entry)
    if os.path.isabs(path) or entry.lower().startswith("file://"):
        return path
    return join(base, entry) if is_url(base) else os.path.join(base, path)


def _glob(ref: str) -> list[str]:
    """Sorted files matching glob ``ref`` (local or remote)."""
    if not is_url(ref):
        return sorted(p for p in globlib.glob(local_path(ref)) if os.path.isfile(p))
    fs, path = filesystem(ref)
    try:
        fs.invalidate_cache()
        found = fs.glob(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as err:
        raise translate(ref, err) from None
    return sorted(fs.unstrip_protocol(p) for p, info in found.items() if info.get("type") == "file")


def _missing(refs: list[str]) -> list[str]:
    """The refs that name no file, in order; remote ones checked with one listing per folder where possible."""
    listings: dict[str, set[str]] = {}
    missing = []
    for ref in refs:
        if not is_url(ref):
            found = os.path.isfile(ref)
        elif len(refs) <= 8 or scheme(ref) in ("http", "https"):  # few, or a web folder (no reliable listing)
            found = exists(ref)
        else:
            folder = parent(ref)
            if folder not in listings:
                listings[folder] = set(list_files(folder))
            found = basename(ref) in listings[folder]
        if not found:
            missing.append(ref)
    return missing
