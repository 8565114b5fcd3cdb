"""Input shards streamed one at a time: WebDataset tar shards or parquet shards, local or fsspec URLs.

For ``encode-dataset`` at scale the unit of work is one input shard, read front to back as a stream: no
global index, nothing copied to a local cache first. A reference names the shards as
:func:`sdvae.storage.files.expand` does (a file, a ``{00000..00099}`` range, a glob, a ``.txt`` list).

* tar shards (what img2dataset writes): a sample is the run of consecutive members sharing a key (the member
  name up to the first dot of its base name, as the ``webdataset`` library groups them); its image member
  is the first with an image extension, its other members are carried as text. Samples without an image
  are left out.
* parquet shards: one sample per row, row groups in order; the image column is a ``datasets`` Image struct
  ``{bytes, path}`` or a plain binary column; the key is the ``key`` column when there is one, else the
  row number in the shard (9 digits).

Bad input: an unreadable row group or row gives a :class:`Sample` with ``error`` set (skipped, counted and
listed by the caller); a truncated or damaged tar keeps the samples before the damage and adds a note naming
the shard; an undecodable image is :meth:`ShardedSource.decode`'s one-line error. A missing shard, a shard
that is not a tar/parquet file at all, an unreachable endpoint or refused credentials stop with one line
(:class:`UserError`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdvae.errors import UserError, first_line
from sdvae.images.load import IMAGE_EXTENSIONS
from sdvae.images.webdataset import is_shard_reference, member_key
from sdvae.storage import files
from sdvae.storage.urls import basename, is_url, parent, redact, scheme

_TAR, _PARQUET = "webdataset", "parquet"


@dataclass
class Sample:
    """One sample of a shard, as stored (nothing decoded yet)."""

    key: str  # key inside its shard: tar member name up to the first dot of its base name; parquet row / `key`
    data: bytes | None  # encoded image bytes (None when error is set)
    ext: str  # image extension (jpg, png, webp...; parquet: "" when unknown)
    extras: dict[str, Any]  # carried tar members as text, parquet columns as stored values (None when missing)
    error: str | None = None  # "SHARDNAME:KEY: problem" for an unreadable member/row/row group
    shard: str = ""  # the shard's short name (ShardedSource.names), for messages


def _suffix_kind(ref: str) -> str | None:
    name = basename(ref).lower()
    return _TAR if name.endswith(".tar") else _PARQUET if name.endswith(".parquet") else None


def _kind(ref: str) -> str | None:
    """``"webdataset"`` / ``"parquet"`` for a shard reference (a ``.txt`` list by its first entry), else None."""
    kind = _suffix_kind(ref)
    if kind is not None or not basename(ref).lower().endswith(".txt"):
        return kind
    if not is_url(ref) and not files.exists(ref):
        return None
    try:
        entries = files.read_list(ref)
    except UserError:
        return _TAR if is_url(ref) else None  # opening it reports why
    return _suffix_kind(entries[0]) if entries else _TAR


def is_sharded_reference(ref: str) -> bool:
    """Whether ``ref`` names tar shards or parquet shards (a file, range, glob or ``.txt`` list; local or URL)."""
    return is_shard_reference(ref) or _kind(ref) == _PARQUET


def _short_names(refs: list[str]) -> list[str]:
    """Display names: each redacted ref relative to the shards' common folder (``00003.tar``)."""
    shown = [redact(r) for r in refs]
    folders = [s.rsplit("/", 1)[0].split("/") if "/" in s else [] for s in shown]
    common = folders[0]
    for parts in folders[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    cut = len("/".join(common)) + 1 if common else 0
    return [s[cut:] for s in shown]


def _text(value: Any) -> str | None:
    """A carried value as text: strings as they are, bytes decoded, other values as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return json.dumps(value, default=str)


class _Counting(io.RawIOBase):
    """A read-only stream that counts the bytes it delivered (to tell a tar's end marker from a cut)."""

    def __init__(self, raw: Any):
        super().__init__()
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.raw.read(-1 if size is None else size)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _schema_features(schema: Any) -> Any:
    """The ``datasets.Features`` of a parquet schema (its ``huggingface`` metadata when ``datasets`` wrote it)."""
    import datasets

    return datasets.Features.from_arrow_schema(schema)


class ShardedSource:
    """Input shards streamed one at a time: WebDataset tar shards or parquet shards, local or fsspec URLs.

    Attributes:
        shards: full refs, in order.
        names: short display names (redacted, relative to the shards' common folder: ``00003.tar``).
        kind: ``"webdataset"`` or ``"parquet"``.
        carry: carried members/columns (None → every non-image member of the first sample of the first shard,
            or every column of the first file's schema but the image).
        notes: problems met while streaming (truncated shards), appended as they happen.
    """

    def __init__(self, ref: str, carry: Sequence[str] | None = None, image_column: str = "image"):
        self.ref, self.image_column = ref, image_column
        kind = _kind(ref)
        what = "parquet shard" if kind == _PARQUET else "tar shard" if kind == _TAR else "shard"
        self.shards = files.expand(ref, what=what)
        kinds = {_suffix_kind(s) for s in self.shards}
        if len(kinds) != 1 or None in kinds:
            raise UserError(f"{redact(ref)}: names {len(self.shards)} file(s) that are not all .tar or all "
                            f".parquet shards (first: {redact(self.shards[0])})")
        self.kind: str = kinds.pop()  # type: ignore[assignment]
        self.names = _short_names(self.shards)
        self.notes: list[str] = []
        self._sizes: dict[str, int | None] | None = None
        columns = self._first_tar_members() if self.kind == _TAR else self._parquet_columns()
        if carry is None:
            self.carry = tuple(columns)
        else:
            unknown = [c for c in carry if c not in columns]
            if unknown:
                what = "the first sample of" if self.kind == _TAR else "the columns of"
                raise UserError(f"{self.names[0]}: {what} this shard has no '{unknown[0]}' to carry "
                                f"(available: {', '.join(columns) or 'none'})")
            self.carry = tuple(carry)

    def __len__(self) -> int:
        return len(self.shards)

    # -- tar ----------------------------------------------------------------------------------------------

    def _first_tar_members(self) -> list[str]:
        """The non-image members of the first sample (with an image) of the first shard."""
        for sample in self._tar_samples(0, carry=None, peek=True):
            return sorted(sample.extras)
        return []

    def _tar_samples(self, k: int, carry: Sequence[str] | None, peek: bool = False) -> Iterator[Sample]:
        ref, name = self.shards[k], self.names[k]
        with files.open_read(ref) as raw:
            stream = _Counting(raw)
            try:
                tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (the with above closes the file)
            except tarfile.TarError as err:
                raise UserError(f"{name}: not a readable tar shard ({first_line(err, with_type=True)})") from None
            key: str | None = None
            members: dict[str, bytes] = {}
            count = 0
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_name, ext = member_key(member.name)
                    if member_name != key:
                        if key is not None and (sample := self._tar_sample(name, key, members, carry)):
                            count += 1
                            yield sample
                        key, members = member_name, {}
                    handle = tar.extractfile(member)
                    members[ext] = handle.read() if handle is not None else b""
                else:
                    if key is not None and (sample := self._tar_sample(name, key, members, carry)):
                        count += 1
                        yield sample
                    if not peek and stream.count < tar.offset + tarfile.BLOCKSIZE:
                        # the stream ended where a header (or the end-of-archive marker) should be
                        self.notes.append(f"{name}: truncated shard, cut after byte {stream.count:,} "
                                          f"({count} sample(s) kept)")
            except (tarfile.TarError, EOFError) as err:
                if count == 0 and key is None:
                    raise UserError(f"{name}: not a readable tar shard ({first_line(err, with_type=True)})") from None
                if not peek:
                    self.notes.append(f"{name}: truncated or damaged shard after {count} sample(s), "
                                      f"{key or 'the next member'} and what follows are lost ({first_line(err)})")

    def _tar_sample(self, name: str, key: str, members: dict[str, bytes], carry: Sequence[str] | None
                    ) -> Sample | None:
        image_ext = next((e for e in members if f".{e}" in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            return None
        data = members.pop(image_ext)
        names = members if carry is None else carry
        extras = {c: _text(members.get(c)) for c in names}
        return Sample(key=key, data=data, ext=image_ext, extras=extras, shard=name)

    # -- parquet ------------------------------------------------------------------------------------------

    def _parquet_file(self, k: int, handle: Any) -> Any:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(handle)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{self.names[k]}: not a readable parquet shard ({first_line(err, with_type=True)})"
                            ) from None

    def _parquet_columns(self) -> list[str]:
        from sdvae.errors import require_extra

        require_extra("pyarrow", "parquet shards")
        with files.open_read(self.shards[0]) as handle:
            schema = self._parquet_file(0, handle).schema_arrow
        names = list(schema.names)
        self._features = _schema_features(schema)
        if self.image_column not in names:
            raise UserError(f"{self.names[0]}: no image column '{self.image_column}' (columns: {', '.join(names)}); "
                            "set the image column")
        return [n for n in names if n != self.image_column]

    def _parquet_samples(self, k: int) -> Iterator[Sample]:
        name = self.names[k]
        with files.open_read(self.shards[k]) as handle:
            pf = self._parquet_file(k, handle)
            names = pf.schema_arrow.names
            if self.image_column not in names:
                raise UserError(f"{name}: no image column '{self.image_column}' (columns: {', '.join(names)})")
            missing = [c for c in self.carry if c not in names]
            if missing:
                raise UserError(f"{name}: no column '{missing[0]}' to carry (columns: {', '.join(names)})")
            wanted = list(dict.fromkeys([self.image_column, *self.carry, *(["key"] if "key" in names else [])]))
            row = 0
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                try:
                    table = pf.read_row_group(g, columns=wanted)
                    columns = {c: table.column(c).to_pylist() for c in wanted}
                except UserError:
                    raise
                except Exception as err:
                    yield Sample(key=f"{row:09d}", data=None, ext="", extras={}, shard=name,
                                 error=f"{name}:{row:09d}: unreadable row group {g} (rows {row}-{row + rows - 1}; "
                                       f"{first_line(err, with_type=True)})")
                    row += rows
                    continue
                for i in range(table.num_rows):
                    yield self._parquet_sample(name, row + i, {c: v[i] for c, v in columns.items()})
                row += table.num_rows

    def _parquet_sample(self, name: str, row: int, values: dict[str, Any]) -> Sample:
        key = str(values["key"]) if values.get("key") is not None else f"{row:09d}"
        extras = {c: values[c] for c in self.carry}  # typed as stored (ClassLabel ints, strings, lists...)
        cell = values[self.image_column]
        path = None
        if isinstance(cell, dict):  # a datasets Image struct {bytes, path}
            data, path = cell.get("bytes"), cell.get("path")
        else:
            data = cell
        ext = basename(path).rpartition(".")[2].lower() if path and "." in basename(path) else ""
        if not isinstance(data, bytes | bytearray) or not data:
            problem = (f"no image bytes (only a path: {path})" if path else "no image")
            return Sample(key=key, data=None, ext=ext, extras=extras, shard=name, error=f"{name}:{key}: {problem}")
        return Sample(key=key, data=bytes(data), ext=ext, extras=extras, shard=name)

    # -- public -------------------------------------------------------------------------------------------

    def samples(self, k: int) -> Iterator[Sample]:
        """Stream shard ``k``'s samples in stored order (see the module docstring for bad input)."""
        if not 0 <= k < len(self.shards):
            raise IndexError(f"{redact(self.ref)}: shard {k} out of range for {len(self.shards)} shards")
        if self.kind == _TAR:
            return self._tar_samples(k, self.carry)
        return self._parquet_samples(k)

    def decode(self, sample: Sample, channels: int = 3) -> torch.Tensor:
        """Decode ``sample``'s image: (C,H,W) float32 in [-1,1].

        Raises:
            UserError: ``"SHARDNAME:KEY.EXT: problem"`` for a sample with an error or an undecodable image.
        """
        from sdvae.images.load import decode_bytes

        if sample.error is not None or sample.data is None:
            raise UserError(sample.error or f"{sample.shard}:{sample.key}: no image")
        where = f"{sample.shard}:{sample.key}" + (f".{sample.ext}" if sample.ext else "")
        return decode_bytes(sample.data, where, channels)

    def describe(self) -> str:
        what = "WebDataset tar shards" if self.kind == _TAR else "parquet shards"
        return f"{what} {redact(self.ref)} ({len(self.shards):,} shards, streamed)"

    def _shard_sizes(self) -> dict[str, int | None]:
        """Shard sizes where a listing gives them cheaply (local: stat; object stores: one listing per folder)."""
        if self._sizes is None:
            sizes: dict[str, int | None] = {}
            listings: dict[str, dict[str, int]] = {}
            for ref in self.shards:
                if not is_url(ref):
                    sizes[ref] = files.size(ref)
                elif scheme(ref) in ("http", "https"):
                    sizes[ref] = None
                else:
                    folder = parent(ref)
                    if folder not in listings:
                        listings[folder] = files.list_files(folder)
                    sizes[ref] = listings[folder].get(basename(ref))
            self._sizes = sizes
        return self._sizes

    def fingerprint(self) -> str:
        """An identity of the input from shard names and sizes (never from reading content)."""
        sizes = self._shard_sizes()
        listing = "\n".join(f"{n}:{sizes.get(s)}" for n, s in zip(self.names, self.shards, strict=True))
        extra = f"{self.image_column}:{','.join(self.carry)}"
        digest = hashlib.sha256(f"{listing}\n{extra}".encode()).hexdigest()[:16]
        return f"{self.kind}-shards:{len(self.shards)}:{digest}"

    def extra_features(self) -> Any:
        """``datasets.Features`` of the carried columns (None when nothing is carried): tar members are strings;
        parquet columns keep the first file's types (a ``datasets`` schema's ClassLabel names included)."""
        if not self.carry:
            return None
        import datasets

        if self.kind == _PARQUET:
            return datasets.Features({column: self._features[column] for column in self.carry})
        return datasets.Features({column: datasets.Value("string") for column in self.carry})
