"""A ``datasets`` dataset streamed shard by shard (``encode-dataset --streaming``): a hub name, or a local folder of
data files, read with ``load_dataset(..., streaming=True)``, so nothing is downloaded or cached as a whole first.

Its shards are the dataset's own (``IterableDataset.num_shards``: usually one per data file); shard k is
``dataset.shard(num_shards, k)``, one work unit of :mod:`sdvae.latents.encode_inputs` like an input tar or parquet
shard. Images stay encoded (``Image(decode=False)``) until :meth:`ShardedSource.decode`; the other columns are
carried with their types; the key is the ``key`` column when there is one, else the row number in the shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

from sdvae.errors import UserError, first_line
from sdvae.images.shard_stream import Sample, ShardedSource


class DatasetsStreamSource(ShardedSource):
    """The shards of a streamed ``datasets`` dataset (see the module docstring)."""

    def __init__(self, ref: str, carry: Sequence[str] | None = None, image_column: str = "image",
                 split: str = "train", cache_dir: str | None = None):
        import datasets

        self.ref, self.image_column, self.split = ref, image_column, split
        try:
            ds = datasets.load_dataset(ref, split=split, streaming=True, cache_dir=cache_dir)
        except Exception as err:  # unreachable hub, unknown name or split: the library's first line
            raise UserError(f"{ref}: cannot stream this dataset (split {split!r}; "
                            f"{first_line(err, with_type=True)})") from None
        columns = list(ds.features or {})
        if image_column not in columns:
            raise UserError(f"{ref}: no image column '{image_column}' (columns: {', '.join(columns)}); set "
                            "--image-column")
        self._ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self._features = ds.features
        self.kind = "datasets"
        self.shards = [f"{ref}[{split}] shard {k}" for k in range(ds.num_shards)]
        self.names = [f"shard{k:05d}" for k in range(ds.num_shards)]
        self.notes: list[str] = []
        others = [c for c in columns if c != image_column]
        unknown = [c for c in carry or () if c not in others]
        if unknown:
            raise UserError(f"{ref}: no column '{unknown[0]}' to carry (available: {', '.join(others) or 'none'})")
        self.carry = tuple(others if carry is None else carry)

    def samples(self, k: int) -> Iterator[Sample]:
        """Stream shard ``k``'s rows in stored order."""
        if not 0 <= k < len(self.shards):
            raise IndexError(f"{self.ref}: shard {k} out of range for {len(self.shards)} shards")
        rows = iter(self._ds.shard(num_shards=len(self.shards), index=k, contiguous=True))
        j = 0
        while True:
            try:
                values = next(rows)
            except StopIteration:
                return
            except Exception as err:  # a data file that cannot be read: one line naming the shard
                raise UserError(f"{self.ref}: {self.names[k]} unreadable after {j} row(s) "
                                f"({first_line(err, with_type=True)})") from None
            yield self._parquet_sample(self.names[k], j, values)
            j += 1

    def describe(self) -> str:
        return f"datasets {self.ref} [{self.split}] ({len(self.shards):,} shards, streamed)"

    def fingerprint(self) -> str:
        """An identity from the reference, split, shard count, image column and carried columns."""
        text = f"{self.ref}\n{self.split}\n{len(self.shards)}\n{self.image_column}:{','.join(self.carry)}"
        return f"datasets-stream:{len(self.shards)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def extra_features(self) -> Any:
        """``datasets.Features`` of the carried columns, as the dataset declares them (None: nothing carried)."""
        if not self.carry:
            return None
        import datasets

        return datasets.Features({column: self._features[column] for column in self.carry})
