"""A latent dataset's rows as WebDataset tar shards (``encode-dataset --format webdataset``).

One tar sample per row, in input-index order. The sample key is the input index, zero-padded to 12
digits (``000000000042``), and its members are

* ``KEY.json``: ``key``, ``index``, ``shape`` [C,h,w], ``original_size``, ``resized_size``, ``crop_box``,
  ``bucket`` (``--buckets`` only) and each carried column (bytes, e.g. a carried image's encoded file,
  as ``{"__bytes__": base64}``);
* ``KEY.latents.safetensors``: one tensor per latent column (``mean``/``logvar`` or ``latent``, then the
  ``*_flip`` ones), shaped (C,h,w), in the stored dtype itself (fp32/fp16/bf16: safetensors has bf16).

so the standard ``webdataset`` library reads them (``wds.WebDataset(url)`` gives ``{"__key__", "json",
"latents.safetensors"}``) and so does any tar reader. The bytes are a pure function of the rows: members in
name order, plain USTAR headers (no pax timestamps), mtime 0, uid/gid 0, so a rerun writes the same shard.

Readers here yield rows in the shape :mod:`sdvae.latents.encode_rows` builds them: latents as flat numpy arrays in
the stored dtype (bf16 as uint16 bit patterns, see :func:`sdvae.latents.format.stored_to_tensor`).
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from sdvae.errors import UserError, first_line
from sdvae.images.webdataset import member_key

JSON_MEMBER = "json"
LATENTS_MEMBER = "latents.safetensors"
ROW_FIELDS = ("key", "index", "shape", "original_size", "resized_size", "crop_box", "bucket")
KEY_DIGITS = 12
# Stored dtype → (numpy dtype of the flat arrays rows carry, safetensors dtype name).
_DTYPES = {"fp32": (np.float32, "F32"), "fp16": (np.float16, "F16"), "bf16": (np.uint16, "BF16")}
_BYTES = "__bytes__"  # JSON stand-in for a bytes value of a carried column


def sample_key(index: int) -> str:
    """The tar sample key of the row of input ``index``: 12 zero-padded digits (sorts as the indices do)."""
    return f"{int(index):0{KEY_DIGITS}d}"


# --------------------------------------------------------------------------------------------------
# Writing


def shard_tar_bytes(rows: list[dict[str, Any]], dtype: str, carried: Sequence[str]) -> bytes:
    """One shard's rows as a tar archive, byte for byte the same for the same rows.

    Args:
        rows: the rows :mod:`sdvae.latents.encode_job` builds, sorted by ``index``: ``key``, ``index``, ``latents``
            ({column: flat numpy array in the stored dtype; bf16 as uint16 bit patterns}), ``shape`` [C,h,w],
            ``original_size``, ``resized_size``, ``crop_box``, optionally ``bucket``, and ``extras``
            ({carried column: value}).
        dtype: the stored dtype, ``fp32``/``fp16``/``bf16``.
        carried: the carried columns to store, in order (each must be in every row's ``extras``).

    Raises:
        UserError: a carried value that JSON cannot hold (the message names the column and row).
    """
    import torch
    from safetensors.torch import save

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    members: list[tuple[str, bytes]] = []
    for row in rows:
        key = sample_key(row["index"])
        doc = {name: _to_json(row[name], name, key) for name in ROW_FIELDS if name in row}
        for column in carried:
            doc[column] = _to_json(row["extras"][column], column, key)
        shape = tuple(int(s) for s in row["shape"])
        tensors = {}
        for column, values in row["latents"].items():
            flat = np.ascontiguousarray(values, dtype=_DTYPES[dtype][0]).reshape(shape)
            tensor = torch.from_numpy(flat.view(np.int16) if dtype == "bf16" else flat)
            tensors[column] = tensor.view(torch.bfloat16) if dtype == "bf16" else tensor
        members.append((f"{key}.{JSON_MEMBER}", json.dumps(doc, ensure_ascii=False).encode()))
        members.append((f"{key}.{LATENTS_MEMBER}", save(tensors)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _to_json(value: Any, column: str, key: str) -> Any:
    """A row value as JSON (bytes → ``{"__bytes__": base64}``, numpy → lists and numbers)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist(), column, key)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, column, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, column, key) for k, v in value.items()}
    raise UserError(f"column {column!r} of row {key}: a {type(value).__name__} value cannot be stored in a "
                    "webdataset shard (JSON holds text, numbers, lists, dicts and bytes)")


def _from_json(value: Any) -> Any:
    """Inverse of :func:`_to_json` (bytes come back as bytes; lists stay lists)."""
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            return base64.b64decode(value[_BYTES])
        return {k: _from_json(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------
# Reading


def decode_sample(members: dict[str, bytes], where: str) -> dict[str, Any]:
    """One tar sample (member extension → bytes) → a row: the fixed fields, ``latents`` ({column: flat numpy in
    the stored dtype}) and ``extras`` ({carried column: value}).

    Raises:
        UserError: a member missing or unreadable (the message names ``where``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    missing = [m for m in (JSON_MEMBER, LATENTS_MEMBER) if m not in members]
    if missing:
        raise UserError(f"{where}: sample has no {missing[0]} member (not a latent dataset shard?)")
    try:
        doc = json.loads(members[JSON_MEMBER])
        tensors = load(members[LATENTS_MEMBER])
    except (ValueError, SafetensorError) as err:
        raise UserError(f"{where}: unreadable sample ({first_line(err, with_type=True)})") from None
    if not isinstance(doc, dict) or any(f not in doc for f in ROW_FIELDS[:-1]):
        raise UserError(f"{where}: the sample's JSON lacks the row fields ({', '.join(ROW_FIELDS[:-1])})")
    row = {name: doc.pop(name) for name in ROW_FIELDS if name in doc}
    row["latents"] = {name: _flat_numpy(t) for name, t in tensors.items()}
    row["extras"] = {name: _from_json(value) for name, value in doc.items()}
    return row


def _flat_numpy(tensor: Any) -> np.ndarray:
    """A (C,h,w) tensor → flat numpy in its stored dtype (bf16 → uint16 bit patterns)."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def read_shard_tar(data: bytes | BinaryIO, where: str = "tar shard") -> Iterator[dict[str, Any]]:
    """The rows of one shard in stored order, read in one pass (the file object need not be seekable).

    Args:
        data: the shard's bytes, or a binary file object positioned at its start.
        where: the shard's name for messages.

    Raises:
        UserError: not a tar archive, or a sample that is not a latent row.
    """
    for key, members in iter_tar_samples(data, where):
        yield decode_sample(members, f"{where}:{key}")


def iter_tar_samples(data: bytes | BinaryIO, where: str = "tar shard") -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one tar shard in stored order, undecoded: (key, {extension: member data}).

    Raises:
        UserError: not a readable tar archive.
    """
    fileobj = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = member_key(member.name)
                if key is not None and name_key != key:
                    yield key, members
                    members = {}
                key = name_key
                extracted = tar.extractfile(member)
                members[ext] = extracted.read() if extracted is not None else b""
    except tarfile.TarError as err:
        raise UserError(f"{where}: not a readable tar shard ({first_line(err, with_type=True)})") from None
    if key is not None:
        yield key, members


class SampleSpan(NamedTuple):
    """Where one sample lies in its shard: bytes [start, stop) hold its members' data (and the headers between)."""

    key: str
    start: int
    stop: int
    members: tuple[tuple[str, int, int], ...]  # (extension, offset from start, size)

    def split(self, blob: bytes) -> dict[str, bytes]:
        """The bytes [start, stop) of the shard → {extension: member data}."""
        return {ext: blob[offset:offset + size] for ext, offset, size in self.members}


def index_shard_tar(fileobj: BinaryIO, where: str) -> list[tuple[SampleSpan, dict[str, Any]]]:
    """Every sample of one shard, in stored order: its span (to read it later by offset) and its JSON document.

    Reads the tar headers and the small JSON members, seeking past the latents (``fileobj`` must be seekable).

    Raises:
        UserError: not a tar archive, or a sample without its JSON or latents.
    """
    samples: list[tuple[SampleSpan, dict[str, Any]]] = []
    groups: dict[str, list[tuple[str, int, int]]] = {}
    docs: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member_key(member.name)
                groups.setdefault(key, []).append((ext, member.offset_data, member.size))
                if ext == JSON_MEMBER:
                    extracted = tar.extractfile(member)
                    docs[key] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{where}: not a readable tar shard ({first_line(err, with_type=True)})") from None
    for key, parts in groups.items():
        exts = {ext for ext, _, _ in parts}
        if JSON_MEMBER not in exts or LATENTS_MEMBER not in exts:
            raise UserError(f"{where}:{key}: sample lacks its {JSON_MEMBER} or {LATENTS_MEMBER} member")
        try:
            doc = json.loads(docs[key])
        except ValueError as err:
            raise UserError(f"{where}:{key}: unreadable JSON ({first_line(err)})") from None
        start, stop = min(o for _, o, _ in parts), max(o + s for _, o, s in parts)
        samples.append((SampleSpan(key, start, stop, tuple((e, o - start, s) for e, o, s in parts)), doc))
    return samples


class TarIndex:
    """The samples of some tar shards, indexed once (headers and JSON members), then read by row number.

    Row i is the i-th sample in shard order then stored order; reading it is one ranged read of its members
    (one request for a URL). Compact: seven integers per row, plus its shape.

    Args:
        refs: the shards (local paths or URLs), in order.
        expected_rows: rows per shard as recorded (checked), or None.

    Raises:
        UserError: an unreadable shard, or one whose row count differs from ``expected_rows``.
    """

    def __init__(self, refs: Sequence[str], expected_rows: Sequence[int] | None = None):
        from sdvae.storage import files
        from sdvae.storage.urls import redact

        self.refs = list(refs)
        columns: list[list[int]] = [[] for _ in range(7)]  # shard, start, stop, json at/size, latents at/size
        self._shapes: list[list[int]] = []
        for s, ref in enumerate(self.refs):
            with files.open_read(ref) as f:
                samples = index_shard_tar(f, redact(ref))
            if expected_rows is not None and len(samples) != int(expected_rows[s]):
                raise UserError(f"{redact(ref)}: holds {len(samples)} rows, the metadata says {expected_rows[s]} "
                                "(a damaged or replaced shard)")
            for span, doc in samples:
                members = {ext: (offset, size) for ext, offset, size in span.members}
                row = (s, span.start, span.stop, *members[JSON_MEMBER], *members[LATENTS_MEMBER])
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
                self._shapes.append(doc["shape"])
        self._index = np.array(columns, dtype=np.int64).reshape(7, -1)

    def __len__(self) -> int:
        return self._index.shape[1]

    def shapes(self) -> list[list[int]]:
        """Every row's stored shape [C,h,w], in row order."""
        return self._shapes

    def read(self, i: int) -> dict[str, Any]:
        """Row ``i`` (negative: from the end) as :func:`decode_sample` gives it.

        Raises:
            IndexError: no such row.
        """
        from sdvae.storage.urls import redact

        s, start, stop, json_at, json_size, lat_at, lat_size = (int(v) for v in self._index[:, i])
        ref = self.refs[s]
        blob = read_range(ref, start, stop)
        members = {JSON_MEMBER: blob[json_at:json_at + json_size], LATENTS_MEMBER: blob[lat_at:lat_at + lat_size]}
        return decode_sample(members, f"{redact(ref)}@{start}")


def read_range(ref: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of file ``ref`` (one ranged request for a URL).

    Raises:
        UserError: unreadable, or shorter than ``stop`` (changed since it was indexed).
    """
    from sdvae.storage import files
    from sdvae.storage.errors import translate
    from sdvae.storage.urls import is_url, local_path, redact

    try:
        if is_url(ref):
            fs, path = files.filesystem(ref)
            data = fs.cat_file(path, start=start, end=stop)
        else:
            with open(local_path(ref), "rb") as f:
                f.seek(start)
                data = f.read(stop - start)
    except Exception as err:
        raise translate(ref, err) from None
    if len(data) != stop - start:
        raise UserError(f"{redact(ref)}: shorter than its index says (changed or truncated since it was opened)")
    return bytes(data)
