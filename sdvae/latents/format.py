"""The stored format of a latent dataset (an ``sdvae encode-dataset`` output): layout, names, metadata,
stored dtypes, and the functions that write and read it. Why writing it this way is exact under ``kill -9``
is in :mod:`sdvae.latents.encode_job`.

``OUT`` is a local folder or an fsspec URL (``s3://bucket/latents``; :mod:`sdvae.storage`). Its layout::

    sdvae_encode_args.json      the arguments that define the output (written first; a rerun must match)
    data/shard-00000.arrow      the rows of work unit 0 (``--format arrow``: an Arrow IPC stream; ``--format
                                webdataset``: data/shard-00000.tar, one tar sample per row, see
                                :mod:`sdvae.latents.webdataset_format`)
    data/shard-00000.skipped.json   unreadable inputs of that unit (only when there are some)
    data/shard-00000.info.json      that unit's row count, bucket counts and preview-map fit sums
    ...
    skipped.txt                 every unreadable input: ``name<TAB>reason`` (one line each)
    dataset_info.json, state.json   what ``datasets.load_from_disk`` reads (arrow layout)
    sdvae_latents.json          dataset-level metadata (written last: present = complete)

A work unit is S consecutive inputs of an indexed source (a folder, a ``datasets`` dataset), or one input shard of
a sharded source (tar or parquet shards, streamed). Every file is written atomically (locally: temporary name,
fsync, rename; in an object store: one PUT, so an object exists complete or not at all), a unit's side files
before its rows, and ``sdvae_latents.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdvae.errors import UserError
from sdvae.storage import files
from sdvae.storage.urls import is_url, join, redact

DATASET_FORMAT = "sdvae-latent-dataset/1"
DATASET_META = "sdvae_latents.json"  # written last: its presence means the dataset is complete
ENCODE_ARGS = "sdvae_encode_args.json"  # written first: the arguments a resumed run must repeat
# Arrow has no bfloat16: bf16 latents are stored as their raw 16-bit patterns (uint16), which is
# lossless and as small as the tensor; fp16 uses Arrow's halffloat. Readers go through
# :func:`stored_to_tensor`.
ARROW_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


LAYOUTS = {"arrow": "arrow", "webdataset": "tar"}  # --format → shard file extension


def read_dataset_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset-level metadata of an ``encode-dataset`` output (a local folder or a URL).

    Returns:
        The JSON object of ``PATH/sdvae_latents.json``: ``model``, ``config_hash``, ``arch_hash``,
        ``config``, ``preprocessing``, ``store``, ``dtype``, ``latent_columns``, ``scaled`` (False),
        ``scaling`` (the scaling/shift in force at encode time), ``rows``, ``skipped``, ``preview_rgb`` (the
        latent→RGB map fitted at encode time, see :mod:`sdvae.latents.preview`; None or absent in older datasets),
        ``layout`` (``arrow``/``webdataset``; absent in older datasets: arrow), ``shard_files`` and
        ``shard_rows`` (each shard's path relative to the dataset and its row count; absent in older ones)...

    Raises:
        UserError: not such a folder, or a run that has not finished (the message says what to do).
    """
    folder = str(path)
    meta_ref = join(folder, DATASET_META)
    if not files.exists(meta_ref):
        if files.exists(join(folder, ENCODE_ARGS)):
            raise UserError(f"{redact(folder)}: encode-dataset has not finished here; run the same command again "
                            "to complete it")
        raise UserError(f"{redact(folder)}: not an `sdvae encode-dataset` output (no {DATASET_META})")
    meta = files.read_json(meta_ref)
    if not isinstance(meta, dict) or meta.get("format") != DATASET_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{redact(meta_ref)}: unknown format {found!r} (expected {DATASET_FORMAT})")
    return meta


def stored_to_tensor(values: Any, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """One stored latent (a flat array from the dataset) → (C,h,w) float32 tensor.

    Args:
        values: flat numpy array (or list) as read from the ``mean``/``logvar``/``latent`` column.
        dtype: the dataset's ``dtype`` (``fp32``/``fp16``/``bf16``; bf16 arrives as uint16 bit patterns).
        shape: (C,h,w) from the row's ``shape`` column.
    """
    import numpy as np

    # np.array copies: rows read from a memory-mapped dataset are read-only buffers.
    if dtype == "bf16":
        tensor = torch.from_numpy(np.array(values, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(values, dtype=ARROW_DTYPES[dtype]))
    return tensor.float().reshape(tuple(int(s) for s in shape))


# --------------------------------------------------------------------------------------------------
# Writing


LATENT_NAMES = ("mean", "logvar", "latent", "mean_flip", "logvar_flip", "latent_flip")
FIXED_COLUMNS = ("key", "index", *LATENT_NAMES, "shape", "original_size", "resized_size", "crop_box", "bucket")


def _stem(k: int, part: int | None = None) -> str:
    return f"data/shard-{k:05d}" + ("" if part is None else f"-{part:04d}")


def shard_name(k: int, layout: str = "arrow", part: int | None = None) -> str:
    """Unit k's rows file, relative to the output: ``data/shard-00000.arrow`` (or ``.tar``); with
    ``--part-size``, part p of it: ``data/shard-00000-0002.arrow``."""
    return f"{_stem(k, part)}.{LAYOUTS[layout]}"


def skip_name(k: int, part: int | None = None) -> str:
    return f"{_stem(k, part)}.skipped.json"


def info_name(k: int, part: int | None = None) -> str:
    """Unit k's (or its part's) row count, bucket counts and preview-map sums (written just before its rows)."""
    return f"{_stem(k, part)}.info.json"


def done_name(k: int) -> str:
    """With ``--part-size``: unit k's marker, ``{"parts": n}``, written after its last part's rows."""
    return f"{_stem(k)}.done.json"


def _base(name: str) -> str:
    return name.removeprefix("data/")


def done_units(out: str, num_units: int, layout: str, parted: bool = False) -> set[int]:
    """The finished units (one listing of ``data/``, not one request per unit): those whose rows file exists, or
    with parts (``parted``) whose done marker exists."""
    present = files.list_files(join(out, "data"))
    name = done_name if parted else (lambda k: shard_name(k, layout))
    return {k for k in range(num_units) if _base(name(k)) in present}


def done_parts(out: str, units: list[int], layout: str) -> dict[int, set[int]]:
    """For each of ``units``, the parts whose rows file exists (one listing)."""
    present = files.list_files(join(out, "data"))
    found: dict[int, set[int]] = {k: set() for k in units}
    for name in present:
        stem, _, ext = name.partition(".")
        fields = stem.split("-")
        if ext == LAYOUTS[layout] and len(fields) == 3 and fields[0] == "shard" and fields[1].isdigit() \
                and fields[2].isdigit() and int(fields[1]) in found:
            found[int(fields[1])].add(int(fields[2]))
    return found


def unit_files(out: str, present: dict[str, int], k: int, layout: str, parted: bool) -> list[str] | None:
    """Unit k's rows files in order (relative to the output), or None while it is unfinished."""
    if not parted:
        name = shard_name(k, layout)
        return [name] if _base(name) in present else None
    if _base(done_name(k)) not in present:
        return None
    parts = int(files.read_json(join(out, done_name(k)))["parts"])
    return [shard_name(k, layout, p) for p in range(parts)]


def combined_rgb_fit(infos: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The preview map fitted on every unit's sums, added in unit order (None: a unit has none, e.g. it
    was written by an older version; or no pixels at all). Depends only on the units' content."""
    import torch

    from sdvae.latents.preview import solve_rgb_map

    xtx = xty = None
    cells = 0
    for sums in infos:
        if sums is None or "cells" not in sums:
            return None
        if sums["cells"]:
            a, b = torch.tensor(sums["xtx"], dtype=torch.float64), torch.tensor(sums["xty"], dtype=torch.float64)
            xtx, xty = (a, b) if xtx is None else (xtx + a, xty + b)
            cells += sums["cells"]
    if xtx is None:
        return None
    weight, bias = solve_rgb_map(xtx, xty)
    return {"weight": weight.tolist(), "bias": bias.tolist(), "cells": cells,
            "maps": "unscaled latent (posterior mean) channels + bias -> RGB in [-1,1]",
            "fit": "least squares on every encoded image, pixels area-averaged to latent resolution"}


def check_arguments(out: str, identity: dict[str, Any]) -> None:
    """Record the arguments in a new output, or refuse to resume one made with other arguments."""
    args_ref = join(out, ENCODE_ARGS)
    if files.exists(args_ref):
        old = files.read_json(args_ref)
        diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diffs:
            said = "; ".join(f"{k} was {old.get(k)!r}, now {identity.get(k)!r}" for k in diffs[:3])
            raise UserError(f"{redact(out)}: started with different arguments ({said}); rerun with the original "
                            "arguments to resume, or choose another output folder")
        return
    if not is_url(out):
        if Path(out).is_file():
            raise UserError(f"{out}: is a file; encode-dataset writes a folder")
        # Another rank may have just written the arguments file (identical content) or data/.
        if Path(out).is_dir() and any(p.name not in (ENCODE_ARGS, "data") and not p.name.startswith(".")
                                      for p in Path(out).iterdir()):
            raise UserError(f"{out}: exists and is not an encode-dataset output; choose a new or empty folder")
    elif any(name != ENCODE_ARGS for name in files.list_files(out)):  # another rank may have just written it
        raise UserError(f"{redact(out)}: holds objects and is not an encode-dataset output; choose a new or empty "
                        "prefix")
    files.write_json(args_ref, identity)


def build_features(store: str, dtype: str, extra: Any, hflip: str = "none", buckets: bool = False) -> Any:
    """The ``datasets.Features`` of the rows (fixed columns first, then the carried ones).

    ``hflip`` ``both`` adds the flipped copies' latent columns; ``buckets`` adds ``bucket`` ([H, W]).
    """
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    latent = datasets.List(datasets.Value(ARROW_DTYPES[dtype]))
    cols: dict[str, Any] = {"key": datasets.Value("string"), "index": datasets.Value("int64")}
    cols.update({name: latent for name in latent_columns(store, hflip)})
    cols.update(shape=ints, original_size=ints, resized_size=ints, crop_box=ints)
    if buckets:
        cols["bucket"] = ints
    cols.update(dict(extra or {}))
    return datasets.Features(cols)


def latent_columns(store: str, hflip: str = "none") -> list[str]:
    """The latent columns of a row: the image's own, then (``hflip`` ``both``) its mirror image's."""
    from sdvae.latents.flips import flip_columns

    own = ["mean", "logvar"] if store == "mean_logvar" else ["latent"]
    return own + (flip_columns(own) if hflip == "both" else [])


def _flat_list_array(arrays: list[np.ndarray], arrow_type: Any) -> Any:
    """Flat numpy arrays → one Arrow list array without a Python object per element."""
    import pyarrow as pa

    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] >= 2**31:
        raise UserError("a shard holds more than 2^31 latent values; lower --shard-size")
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=arrow_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=arrow_type))


def arrow_shard_bytes(rows: list[dict[str, Any]], features: Any) -> bytes:
    """One unit's rows (sorted by input index) as an Arrow IPC stream."""
    import pyarrow as pa
    from datasets.features.features import encode_nested_example

    rows = sorted(rows, key=lambda r: r["index"])
    schema = features.arrow_schema
    arrays = []
    for field in schema:
        name = field.name
        if name in LATENT_NAMES:
            arrays.append(_flat_list_array([r["latents"][name] for r in rows], field.type.value_type))
        elif name in FIXED_COLUMNS:
            arrays.append(pa.array([r[name] for r in rows], type=field.type))
        else:  # carried column: encoded as datasets would (Image dicts, ClassLabel names → ints...)
            column = [encode_nested_example(features[name], r["extras"][name]) for r in rows]
            arrays.append(pa.array(column, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_unit(out: str, k: int, rows: list[dict[str, Any]], skipped: list[dict[str, Any]], features: Any,
               layout: str, fit: dict[str, Any] | None = None, part: int | None = None, final: bool = False) -> None:
    """Write unit k (or part ``part`` of it): its skip report and info first, then the rows file, which is what
    marks it as done; after a unit's ``final`` part, its done marker."""
    if skipped:
        files.write_json(join(out, skip_name(k, part)), skipped)
    info: dict[str, Any] = {"rows": len(rows), "cells": 0}
    if fit is not None:
        info.update(cells=fit["cells"], xtx=fit["xtx"].tolist(), xty=fit["xty"].tolist())
    if "bucket" in features:
        info["buckets"] = _count_buckets(r["bucket"] for r in rows)
    files.write_json(join(out, info_name(k, part)), info)
    if layout == "webdataset":
        from sdvae.latents.webdataset_format import shard_tar_bytes

        data = shard_tar_bytes(sorted(rows, key=lambda r: r["index"]), _stored_dtype(features),
                               [c for c in features if c not in FIXED_COLUMNS])
    else:
        data = arrow_shard_bytes(rows, features)
    files.write_bytes(join(out, shard_name(k, layout, part)), data)
    if part is not None and final:
        write_done_marker(out, k, part + 1)


def write_done_marker(out: str, k: int, parts: int) -> None:
    """With ``--part-size``: unit k is complete, in ``parts`` parts."""
    files.write_json(join(out, done_name(k)), {"parts": parts})


def _stored_dtype(features: Any) -> str:
    """The stored latent dtype (fp32/fp16/bf16) from the features' latent column."""
    name = next(c for c in features if c in LATENT_NAMES)
    arrow = features[name].feature.dtype
    return {v: k for k, v in ARROW_DTYPES.items()}[arrow]


def _count_buckets(buckets: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for h, w in buckets:
        counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
    return counts


def _legacy_info(out: str, name: str) -> dict[str, Any]:
    """Row and bucket counts of a rows file written before ``info.json`` existed (local arrow only); no fit sums."""
    import pyarrow as pa

    with pa.memory_map(str(Path(out) / name)) as source:
        table = pa.ipc.open_stream(source).read_all()
    info: dict[str, Any] = {"rows": table.num_rows}
    if "bucket" in table.column_names:
        info["buckets"] = _count_buckets(table.column("bucket").to_pylist())
    return info


def bucket_histogram(infos: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per bucket over the units, ``{"HxW": count}`` in order of aspect ratio (width / height)."""
    counts: dict[tuple[int, int], int] = {}
    for info in infos:
        for name, n in info.get("buckets", {}).items():
            h, w = (int(v) for v in name.split("x"))
            counts[(h, w)] = counts.get((h, w), 0) + n
    return {f"{h}x{w}": counts[(h, w)] for h, w in sorted(counts, key=lambda s: (s[1] / s[0], s[0]))}


def finalize(out: str, identity: dict[str, Any], features: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Write the dataset files if every unit is present; return the metadata (None: units missing).

    Safe to run in several processes at once: the content is a pure function of the units' files, and
    every file is replaced atomically. ``sdvae_latents.json`` comes last, so its presence means complete.
    Reads the small side files only (one listing of ``data/``), never the rows, so it is cheap in a bucket.
    """
    num_units, layout = identity["num_shards"], identity.get("layout", "arrow")
    parted = bool(identity.get("part_size"))
    present = files.list_files(join(out, "data"))
    units = [unit_files(out, present, k, layout, parted) for k in range(num_units)]
    if any(u is None for u in units):
        return None
    names = [name for unit in units for name in unit or ()]
    skipped, infos = [], []
    for reports, info in _side_files(out, names, present):
        skipped.extend(reports)
        infos.append(info)
    shard_rows = [int(info["rows"]) for info in infos]
    meta = {**meta, "rows": sum(shard_rows), "skipped": len(skipped), "num_shards": num_units, "layout": layout,
            "shard_files": names, "shard_rows": shard_rows, "preview_rgb": combined_rgb_fit(infos)}
    if meta.get("num_inputs") is None:  # streamed shards are counted as they are read
        meta["num_inputs"] = meta["rows"] + len(skipped)
    if "buckets" in meta:
        meta["bucket_histogram"] = bucket_histogram(infos)
    report = "".join(f"{s['name']}\t{' '.join(s['reason'].split())}\n" for s in skipped)
    files.write_bytes(join(out, "skipped.txt"), report.encode())
    if layout == "arrow":
        _write_datasets_files(out, names, present, features, meta)
    if not is_url(out):
        for leftover in (Path(out) / "data").glob(".shard-*.tmp"):  # from killed writers; every unit is final now
            leftover.unlink(missing_ok=True)
    files.write_json(join(out, DATASET_META), meta)
    return meta


def _side_files(out: str, names: list[str], present: dict[str, int]) -> list[tuple[list[Any], dict[str, Any]]]:
    """(skip reports, info) of each rows file, in order; read by 16 threads in an object store, where each small
    file is a request (10,000 units: seconds rather than minutes)."""
    def read(name: str) -> tuple[list[Any], dict[str, Any]]:
        side = name.rsplit(".", 1)[0]
        reports = files.read_json(join(out, side + ".skipped.json")) if _base(side + ".skipped.json") in present \
            else []
        has_info = _base(side + ".info.json") in present
        return reports, files.read_json(join(out, side + ".info.json")) if has_info else _legacy_info(out, name)

    if not is_url(out):
        return [read(name) for name in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, names))


def _write_datasets_files(out: str, names: list[str], sizes: dict[str, int], features: Any,
                          meta: dict[str, Any]) -> None:
    """``dataset_info.json`` and ``state.json``: what ``datasets.load_from_disk(OUT)`` needs."""
    info = {"citation": "", "description": json.dumps(meta, sort_keys=True), "features": features.to_dict(),
            "homepage": "", "license": "", "dataset_size": sum(sizes[n.removeprefix("data/")] for n in names)}
    files.write_json(join(out, "dataset_info.json"), info)
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    files.write_json(join(out, "state.json"), {
        "_data_files": [{"filename": n} for n in names], "_fingerprint": fingerprint,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None})
