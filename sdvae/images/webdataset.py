"""WebDataset tar shards as an image source: what img2dataset writes (``00000.tar`` … holding ``KEY.jpg`` with
``KEY.json`` / ``KEY.txt`` beside it).

A reference names shards, local or fsspec URLs (``s3://bucket/data/00000.tar``), as a file (``data/00000.tar``),
a brace range (``data/{00000..00099}.tar``, zero padding kept), a glob (``data/*.tar``) or a list file
(``shards.txt``, one shard per line, relative to the list's folder): :func:`sdvae.storage.files.expand`.
Shards are taken in the order given (ranges and lists) or sorted (globs); samples in
the order they are stored. A sample is the run of members sharing a key: the member name up to the first dot
of its base name, as the ``webdataset`` library groups them. Samples without an image member are left out;
a sample's other members (``json``, ``txt``, ``cls``, …) are its carried columns, as text.

Opening a source reads the tar headers only (seeking past the data), so the index costs one pass over the
headers; images are read and decoded on demand by offset. A shard that ends early (truncated) keeps the
samples stored before the damage and is reported in :attr:`WebDatasetSource.notes` (``encode-dataset`` prints
them as notes).
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Sequence
from typing import Any

import torch

from sdvae.errors import UserError, first_line
from sdvae.images.image_source import ImageSource
from sdvae.images.load import IMAGE_EXTENSIONS, decode_bytes
from sdvae.storage import files
from sdvae.storage.urls import basename, is_url, redact


def is_shard_reference(ref: str) -> bool:
    """Whether ``ref`` names tar shards (a ``.tar`` file, range or glob, local or URL) or a ``.txt`` list of them.

    A list is recognised by its first entry (a list of ``.parquet`` files is not one); reading a list that
    cannot be read counts a URL as one (opening it then reports why) and a missing local file as not one.
    """
    name = basename(ref).lower()
    if name.endswith(".tar"):
        return True
    if not name.endswith(".txt"):
        return False
    if not is_url(ref) and not files.exists(ref):
        return False
    try:
        entries = files.read_list(ref)
    except UserError:
        return is_url(ref)
    return not entries or basename(entries[0]).lower().endswith(".tar")


def expand_shards(ref: str) -> list[str]:
    """The shard refs (local paths or URLs) a reference names, each checked to exist (:func:`files.expand`).

    Raises:
        UserError: a pattern that matches nothing, a missing shard, or a list naming no shard.
    """
    return files.expand(ref, what="tar shard")


def member_key(name: str) -> tuple[str, str]:
    """A tar member name as (sample key, extension): ``dir/KEY.ext.more`` → (``dir/KEY``, ``ext.more``), as
    webdataset groups members."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _index_shard(ref: str) -> tuple[list[tuple[str, str, int, int, dict[str, tuple[int, int]]]], str | None]:
    """(samples, problem) of one shard: (key, image ext, offset, size, {other ext: (offset, size)}) per
    sample with an image, in stored order; ``problem`` describes a shard that ends early (None if intact)."""
    samples: list[tuple[str, str, int, int, dict[str, tuple[int, int]]]] = []
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    problem = None
    path = redact(ref)
    file_size = files.size(ref)
    try:
        with files.open_read(ref) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:  # tarfile stops quietly at a cut; we say so
                    problem = f"{path}: truncated shard, {member.name} and what follows are cut off"
                    break
                key, ext = member_key(member.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size)
            else:  # no cut inside a member: a complete archive still ends with two zero blocks
                end = tar.offset
                f.seek(end)
                tail = f.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    problem = f"{path}: truncated shard, cut after byte {end:,} (no end-of-archive marker)"
    except UserError:
        raise
    except (tarfile.TarError, OSError) as err:
        if not order:
            raise UserError(f"{path}: not a readable tar shard ({first_line(err, with_type=True)})") from None
        problem = f"{path}: damaged shard after {len(order)} sample(s) ({first_line(err)})"
    for key in order:
        members = groups[key]
        image_ext = next((e for e in members if f".{e}" in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            continue
        offset, size = members.pop(image_ext)
        samples.append((key, image_ext, offset, size, members))
    return samples, problem


class WebDatasetSource(ImageSource):
    """Samples of local WebDataset tar shards, in shard order then stored order."""

    def __init__(self, ref: str, carry: Sequence[str] | None = ()):
        self.ref = ref
        self.shards = expand_shards(ref)
        self.items: list[tuple[int, str, str, int, int, dict[str, tuple[int, int]]]] = []
        self.notes: list[str] = []
        for s, path in enumerate(self.shards):
            samples, problem = _index_shard(path)
            self.items += [(s, *sample) for sample in samples]
            if problem:
                self.notes.append(problem)
        columns = sorted({ext for item in self.items for ext in item[5]})
        if carry is None:
            self.carry = tuple(columns)
        else:
            unknown = [c for c in carry if c not in columns]
            if unknown:
                raise UserError(f"{redact(ref)}: no sample has a '{unknown[0]}' member to carry "
                                f"(members besides the image: {', '.join(columns) or 'none'})")
            self.carry = tuple(carry)

    def __len__(self) -> int:
        return len(self.items)

    def _item(self, i: int) -> tuple[int, str, str, int, int, dict[str, tuple[int, int]]]:
        if not 0 <= i < len(self.items):
            raise IndexError(f"{self.ref}: index {i} out of range for {len(self.items)} images")
        return self.items[i]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with files.open_read(self.shards[shard]) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise UserError(f"{redact(self.shards[shard])}: member data cut short (truncated shard)")
        return data

    def load(self, i: int, channels: int = 3) -> torch.Tensor:
        """Decode sample ``i``'s image: (C,H,W) float32 in [-1,1] (see ``ImageSource.load``)."""
        shard, key, ext, offset, size, _ = self._item(i)
        where = f"{redact(self.shards[shard])}:{key}.{ext}"
        try:
            data = self._read(shard, offset, size)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        return decode_bytes(data, where, channels)

    def name(self, i: int) -> str:
        shard, key, ext, *_ = self._item(i)
        return f"{basename(self.shards[shard])}:{key}.{ext}"

    def key(self, i: int) -> str:
        shard, key, *_ = self._item(i)
        return f"{basename(self.shards[shard])}/{key}"

    def describe(self) -> str:
        return f"WebDataset tar shards {redact(self.ref)} ({len(self.shards):,} shards, {len(self):,} images)"

    def extras(self, i: int) -> dict[str, Any]:
        shard, *_, members = self._item(i)
        out: dict[str, Any] = {}
        for column in self.carry:
            if column in members:
                out[column] = self._read(shard, *members[column]).decode("utf-8", errors="replace")
            else:
                out[column] = None
        return out

    def extra_features(self) -> Any:
        if not self.carry:
            return None
        import datasets

        return datasets.Features({column: datasets.Value("string") for column in self.carry})

    def fingerprint(self) -> str:
        listing = "\n".join(f"{basename(self.shards[s])}/{key}.{ext}:{size}" for s, key, ext, _, size, _ in self.items)
        return f"webdataset:{len(self)}:{hashlib.sha256(listing.encode()).hexdigest()[:16]}"
