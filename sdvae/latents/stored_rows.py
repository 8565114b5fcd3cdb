"""A latent dataset's stored rows, in either layout (Arrow IPC shards or WebDataset tar shards,
:mod:`sdvae.latents.format`), from a local folder or a URL: :class:`LatentShards` (metadata, shard files, rows
per shard, a shard's rows in order) for :class:`~sdvae.latents.stream.LatentStream`, and rows by number for
:class:`~sdvae.latents.dataset.LatentDataset`:

* arrow, local: ``datasets.load_from_disk`` (memory-mapped, one columnar read per batch);
* arrow, URL: an Arrow IPC stream has no row index, so a row's shard is read whole through fsspec when first
  needed and the last two stay in memory (no local copy): one read per shard in order, but one per row in
  random order (train from a URL with the webdataset layout or ``LatentStream``);
* webdataset, local or URL: every shard's tar headers are indexed once (reading the small JSON members for the
  shapes); a row is then one ranged read of its two members.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sdvae.errors import UserError
from sdvae.latents.format import read_dataset_meta
from sdvae.storage.urls import is_url, join, redact

ROW_COLUMNS = ("index", "key", "shape", "original_size", "resized_size", "crop_box")  # besides latents, carried
LAYOUTS = ("arrow", "webdataset")
# A row as the readers hand it over: ({latent column: flat numpy array in the stored dtype}, {ROW_COLUMNS and
# the carried columns: Python values}).
StoredRow = tuple[dict[str, Any], dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# Shards


class LatentShards:
    """A latent dataset's shards: metadata, layout, shard files in order and rows per shard.

    Args:
        ref: the dataset (a local folder or a URL).

    Raises:
        UserError: not a finished latent dataset, or an unknown layout.
    """

    def __init__(self, ref: str):
        self.ref, self.where = ref, redact(ref)
        self.meta = read_dataset_meta(ref)
        self.layout = self.meta.get("layout", "arrow")
        if self.layout not in LAYOUTS:
            raise UserError(f"{self.where}: unknown layout {self.layout!r} (this sdvae reads {', '.join(LAYOUTS)})")
        names = self.meta.get("shard_files")
        if names is None:
            if self.layout != "arrow":
                raise UserError(f"{self.where}: the metadata lists no shard_files")
            names = _arrow_shard_names(ref)
        self.files = [join(ref, name) for name in names]
        rows = self.meta.get("shard_rows")
        self._rows = [int(n) for n in rows] if rows is not None else None
        self._features: Any = False  # the arrow layout's datasets.Features, read on first use

    def shard_rows(self) -> list[int]:
        """Rows per shard: as recorded, or (older datasets) counted once by reading the shards."""
        if self._rows is None:
            self._rows = [sum(1 for _ in self.iter_rows(s, [], [])) for s in range(len(self.files))]
        return self._rows

    def iter_rows(self, s: int, latent_columns: Sequence[str], carried: Sequence[str],
                  skip: int = 0) -> Iterator[StoredRow]:
        """The rows of shard ``s`` in order (the first ``skip`` left out, without decoding them), read in one pass."""
        ref = self.files[s]
        if self.layout == "webdataset":
            from sdvae.latents.webdataset_format import decode_sample, iter_tar_samples
            from sdvae.storage import files

            with files.open_read(ref) as f:
                for i, (key, members) in enumerate(iter_tar_samples(f, redact(ref))):
                    if i >= skip:
                        yield _tar_row(decode_sample(members, f"{redact(ref)}:{key}"), latent_columns, carried)
            return
        import pyarrow as pa

        features = self.carried_features(carried)
        with _open_arrow(ref) as source:
            seen = 0
            for batch in pa.ipc.open_stream(source):
                if seen + batch.num_rows > skip:
                    yield from _arrow_rows(batch, latent_columns, carried, features, max(0, skip - seen))
                seen += batch.num_rows

    def read_arrow_shard(self, s: int) -> Any:
        """Shard ``s`` of an arrow-layout dataset, whole, as one ``pyarrow.RecordBatch``."""
        import pyarrow as pa

        from sdvae.storage import files

        ref = self.files[s]
        try:
            table = pa.ipc.open_stream(pa.py_buffer(files.read_bytes(ref))).read_all().combine_chunks()
        except pa.ArrowInvalid as err:
            raise UserError(f"{redact(ref)}: not an Arrow IPC stream ({err})") from None
        return pa.RecordBatch.from_arrays([table.column(c).combine_chunks() for c in table.column_names],
                                          schema=table.schema)

    def carried_features(self, carried: Sequence[str]) -> Any:
        """``datasets.Features`` of the carried columns (arrow layout: how ``datasets`` decodes them), or None."""
        if not carried:
            return None
        import datasets

        from sdvae.storage import files

        if self._features is False:
            info_ref = join(self.ref, "dataset_info.json")
            self._features = files.read_json(info_ref)["features"] if files.exists(info_ref) else None
            self._features = self._features and datasets.Features.from_dict(self._features)
        if self._features is None:
            return None
        return datasets.Features({c: self._features[c] for c in carried if c in self._features})


def _arrow_shard_names(ref: str) -> list[str]:
    """``data/shard-*.arrow`` of a dataset whose metadata predates ``shard_files``, in name order."""
    from sdvae.storage import files

    names = files.list_files(join(ref, "data"))
    found = sorted(n for n in names if n.startswith("shard-") and n.endswith(".arrow"))
    if not found:
        raise UserError(f"{redact(ref)}: no data/shard-*.arrow files")
    return [f"data/{n}" for n in found]


def _open_arrow(ref: str) -> Any:
    """A context manager reading Arrow shard ``ref``: memory-mapped when local, streamed through fsspec otherwise."""
    if is_url(ref):
        from sdvae.storage import files

        return files.open_read(ref)
    import pyarrow as pa

    from sdvae.storage.urls import local_path

    return pa.memory_map(local_path(ref))


def _arrow_rows(batch: Any, latent_columns: Sequence[str], carried: Sequence[str], features: Any,
                start: int = 0, stop: int | None = None) -> Iterator[StoredRow]:
    """Rows [start, stop) of an Arrow record batch, latents as flat numpy views (no copy per value)."""
    stop = batch.num_rows if stop is None else stop
    latents = {}
    for name in latent_columns:
        column = batch.column(name)
        latents[name] = (column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy())
    others = {name: batch.column(name).slice(start, stop - start).to_pylist() for name in (*ROW_COLUMNS, *carried)}
    for j in range(start, stop):
        stored = {name: values[offsets[j]:offsets[j + 1]] for name, (values, offsets) in latents.items()}
        row = {name: column[j - start] for name, column in others.items()}
        if features is not None:
            row.update(features.decode_example({c: row[c] for c in features}))
        yield stored, row


def _tar_row(row: dict[str, Any], latent_columns: Sequence[str], carried: Sequence[str]) -> StoredRow:
    """A row of :func:`~sdvae.latents.webdataset_format.decode_sample` → :data:`StoredRow`."""
    out = {name: row[name] for name in ROW_COLUMNS}
    out.update({c: row["extras"].get(c) for c in carried})
    return {name: row["latents"][name] for name in latent_columns}, out


# --------------------------------------------------------------------------------------------------
# Rows by number, per layout


class _DatasetsRows:
    """Arrow layout in a local folder, through ``datasets.load_from_disk`` (memory-mapped)."""

    def __init__(self, path: str, latent_columns: Sequence[str], carried: Sequence[str]):
        import datasets

        ds = datasets.load_from_disk(path)
        self._latents = ds.with_format("numpy", columns=list(latent_columns))
        self._rest = ds.select_columns([*ROW_COLUMNS, *carried])

    def __len__(self) -> int:
        return len(self._rest)

    def shapes(self) -> list[Sequence[int]]:
        return list(self._rest["shape"])

    def get(self, indices: list[int]) -> list[StoredRow]:
        rows, stored = self._rest[indices], self._latents[indices]
        return [({k: v[j] for k, v in stored.items()}, {k: v[j] for k, v in rows.items()})
                for j in range(len(indices))]


class _ArrowShardRows:
    """Arrow layout behind a URL: a row's shard is read whole when needed; the last two stay in memory."""

    CACHED = 2

    def __init__(self, shards: LatentShards, latent_columns: Sequence[str], carried: Sequence[str]):
        self.shards, self.latent_columns, self.carried = shards, list(latent_columns), list(carried)
        self._starts = np.cumsum([0, *shards.shard_rows()])
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _batch(self, s: int) -> Any:
        if s in self._cache:
            self._cache.move_to_end(s)
        else:
            self._cache[s] = self.shards.read_arrow_shard(s)
            while len(self._cache) > self.CACHED:
                self._cache.popitem(last=False)
        return self._cache[s]

    def shapes(self) -> list[Sequence[int]]:
        return [shape for s in range(len(self.shards.files)) for shape in self._batch(s).column("shape").to_pylist()]

    def get(self, indices: list[int]) -> list[StoredRow]:
        features = self.shards.carried_features(self.carried)
        out = []
        for i in indices:
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for {len(self)} rows")
            i %= len(self)
            s = int(np.searchsorted(self._starts, i, side="right")) - 1
            j = i - int(self._starts[s])
            out.extend(_arrow_rows(self._batch(s), self.latent_columns, self.carried, features, j, j + 1))
        return out


class _TarRows:
    """Webdataset layout (local or URL): the tar headers indexed once, a row read by offset."""

    def __init__(self, shards: LatentShards, latent_columns: Sequence[str], carried: Sequence[str]):
        from sdvae.latents.webdataset_format import TarIndex

        self.index = TarIndex(shards.files, shards.meta.get("shard_rows"))
        self.latent_columns, self.carried = list(latent_columns), list(carried)

    def __len__(self) -> int:
        return len(self.index)

    def shapes(self) -> list[Sequence[int]]:
        return list(self.index.shapes())

    def get(self, indices: list[int]) -> list[StoredRow]:
        return [_tar_row(self.index.read(i), self.latent_columns, self.carried) for i in indices]


def open_rows(shards: LatentShards, latent_columns: Sequence[str], carried: Sequence[str]) -> Any:
    """The rows of ``shards`` by number (``len``, ``shapes()``, ``get(indices) -> [StoredRow]``), read the best way
    for its layout and location (see the module docstring)."""
    if shards.layout == "webdataset":
        return _TarRows(shards, latent_columns, carried)
    if is_url(shards.ref):
        return _ArrowShardRows(shards, latent_columns, carried)
    return _DatasetsRows(shards.ref, latent_columns, carried)
