"""WebDataset tar shards as an image source: what img2dataset writes (``00000.tar`` … holding ``KEY.jpg`` with
``KEY.json`` / ``KEY.txt`` beside it).

A reference names local shards as a file (``data/00000.tar``), a brace range (``data/{00000..00099}.tar``,
zero padding kept), a glob (``data/*.tar``) or a list file (``shards.txt``, one shard path per line, relative
to the list's folder). Shards are taken in the order given (ranges and lists) or sorted (globs); samples in
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
import io
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdvae.errors import UserError, first_line
from sdvae.images.image_source import ImageSource
from sdvae.images.load import IMAGE_EXTENSIONS, image_to_tensor

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_reference(ref: str) -> bool:
    """Whether ``ref`` names tar shards (a ``.tar`` file, range or glob) or a ``.txt`` list of them."""
    return ref.lower().endswith(".tar") or (ref.lower().endswith(".txt") and Path(ref).expanduser().is_file())


def expand_shards(ref: str) -> list[Path]:
    """The shard files a reference names (see the module docstring), each checked to exist.

    Raises:
        UserError: a pattern that matches nothing, a missing shard, or a list naming no shard.
    """
    if ref.lower().endswith(".txt"):
        listing = Path(ref).expanduser()
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not names:
            raise UserError(f"{ref}: the shard list names no shard")
        paths = [p if p.is_absolute() else listing.parent / p for p in map(Path, names)]
    else:
        match = _BRACE.search(ref)
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo) if lo.startswith("0") else 0
            paths = [Path(ref[:match.start()] + str(n).zfill(width) + ref[match.end():]).expanduser()
                     for n in range(int(lo), int(hi) + 1)]
        elif set("*?[") & set(ref):
            paths = sorted(Path(ref).expanduser().parent.glob(Path(ref).name))
            if not paths:
                raise UserError(f"{ref}: no tar shards match this pattern")
        else:
            paths = [Path(ref).expanduser()]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such tar shard" + (f" ({len(missing)} of {len(paths)} missing)"
                                                              if len(missing) > 1 else ""))
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """``dir/KEY.ext.more`` → (``dir/KEY``, ``ext.more``), as webdataset groups members."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _index_shard(path: Path) -> tuple[list[tuple[str, str, int, int, dict[str, tuple[int, int]]]], str | None]:
    """(samples, problem) of one shard: (key, image ext, offset, size, {other ext: (offset, size)}) per
    sample with an image, in stored order; ``problem`` describes a shard that ends early (None if intact)."""
    samples: list[tuple[str, str, int, int, dict[str, tuple[int, int]]]] = []
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    problem = None
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:  # tarfile stops quietly at a cut; we say so
                    problem = f"{path}: truncated shard, {member.name} and what follows are cut off"
                    break
                key, ext = _split_name(member.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size)
            else:  # no cut inside a member: a complete archive still ends with two zero blocks
                end = tar.offset
                with open(path, "rb") as f:
                    f.seek(end)
                    tail = f.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    problem = f"{path}: truncated shard, cut after byte {end:,} (no end-of-archive marker)"
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
                raise UserError(f"{ref}: no sample has a '{unknown[0]}' member to carry "
                                f"(members besides the image: {', '.join(columns) or 'none'})")
            self.carry = tuple(carry)

    def __len__(self) -> int:
        return len(self.items)

    def _item(self, i: int) -> tuple[int, str, str, int, int, dict[str, tuple[int, int]]]:
        if not 0 <= i < len(self.items):
            raise IndexError(f"{self.ref}: index {i} out of range for {len(self.items)} images")
        return self.items[i]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise UserError(f"{self.shards[shard]}: member data cut short (truncated shard)")
        return data

    def load(self, i: int, channels: int = 3) -> torch.Tensor:
        """Decode sample ``i``'s image: (C,H,W) float32 in [-1,1] (see ``ImageSource.load``)."""
        shard, key, ext, offset, size, _ = self._item(i)
        where = f"{self.shards[shard]}:{key}.{ext}"
        try:
            with Image.open(io.BytesIO(self._read(shard, offset, size))) as img:
                img.load()
                return image_to_tensor(img, channels=channels).tensor[0]
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except Exception as err:  # one bad member must not end a long run
            raise UserError(f"{where}: unreadable image ({first_line(err, with_type=True)})") from None

    def name(self, i: int) -> str:
        shard, key, ext, *_ = self._item(i)
        return f"{self.shards[shard].name}:{key}.{ext}"

    def key(self, i: int) -> str:
        shard, key, *_ = self._item(i)
        return f"{self.shards[shard].name}/{key}"

    def describe(self) -> str:
        return f"WebDataset tar shards {self.ref} ({len(self.shards):,} shards, {len(self):,} images)"

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
        listing = "\n".join(f"{self.shards[s].name}/{key}.{ext}:{size}" for s, key, ext, _, size, _ in self.items)
        return f"webdataset:{len(self)}:{hashlib.sha256(listing.encode()).hexdigest()[:16]}"
