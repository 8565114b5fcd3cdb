"""The on-disk format of a latent dataset (an ``sdvae encode-dataset`` output): layout, names, metadata,
stored dtypes, and the functions that write and read it. Why writing it this way is exact under ``kill -9``
is in :mod:`sdvae.latents.export`.

Layout of the output folder ``OUT`` (a ``datasets`` dataset: ``datasets.load_from_disk(OUT)``)::

    sdvae_encode_args.json      the arguments that define the output (written first; a rerun must match)
    data/shard-00000.arrow      rows of inputs [0, S), Arrow IPC stream (S = --shard-size)
    data/shard-00000.skipped.json   unreadable inputs of that shard (only when there are some)
    data/shard-00000.rgbfit.json    that shard's sums for the preview map's least-squares fit
    ...
    skipped.txt                 every unreadable input: ``name<TAB>reason`` (one line each)
    dataset_info.json, state.json   what ``datasets.load_from_disk`` reads
    sdvae_latents.json          dataset-level metadata (written last: present = complete)

A shard file is written atomically once complete, and ``sdvae_latents.json`` last.
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

from sdvae.atomic import atomic_file, write_json
from sdvae.errors import UserError

DATASET_FORMAT = "sdvae-latent-dataset/1"
DATASET_META = "sdvae_latents.json"  # written last: its presence means the dataset is complete
ENCODE_ARGS = "sdvae_encode_args.json"  # written first: the arguments a resumed run must repeat
# Arrow has no bfloat16: bf16 latents are stored as their raw 16-bit patterns (uint16), which is
# lossless and as small as the tensor; fp16 uses Arrow's halffloat. Readers go through
# :func:`stored_to_tensor`.
ARROW_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


def read_dataset_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset-level metadata of an ``encode-dataset`` output folder.

    Returns:
        The JSON object of ``PATH/sdvae_latents.json``: ``model``, ``config_hash``, ``arch_hash``,
        ``config``, ``preprocessing``, ``store``, ``dtype``, ``latent_columns``, ``scaled`` (False),
        ``scaling`` (the scaling/shift in force at encode time), ``rows``, ``skipped``, ``preview_rgb`` (the
        latent→RGB map fitted at encode time, see :mod:`sdvae.latents.preview`; None or absent in older datasets)...

    Raises:
        UserError: not such a folder, or a run that has not finished (the message says what to do).
    """
    folder = Path(path)
    meta_path = folder / DATASET_META
    if not meta_path.is_file():
        if (folder / ENCODE_ARGS).is_file():
            raise UserError(f"{folder}: encode-dataset has not finished here; run the same command again to "
                            "complete it")
        raise UserError(f"{folder}: not an `sdvae encode-dataset` output (no {DATASET_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_path}: unreadable ({err})") from None
    if meta.get("format") != DATASET_FORMAT:
        raise UserError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {DATASET_FORMAT})")
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


def shard_path(out: Path, k: int) -> Path:
    return out / "data" / f"shard-{k:05d}.arrow"


def skip_path(out: Path, k: int) -> Path:
    return out / "data" / f"shard-{k:05d}.skipped.json"


def rgb_fit_path(out: Path, k: int) -> Path:
    """Shard k's preview-map sums (written just before the shard: a finished shard has them)."""
    return out / "data" / f"shard-{k:05d}.rgbfit.json"


def combined_rgb_fit(out: Path, num_shards: int) -> dict[str, Any] | None:
    """The preview map fitted on every shard's sums, added in shard order (None: a shard has none, e.g. it
    was written by an older version; or no pixels at all). Depends only on the shards' content."""
    import torch

    from sdvae.latents.preview import solve_rgb_map

    xtx = xty = None
    cells = 0
    for k in range(num_shards):
        path = rgb_fit_path(out, k)
        if not path.is_file():
            return None
        sums = json.loads(path.read_text())
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


def check_arguments(out: Path, identity: dict[str, Any]) -> None:
    """Record the arguments in a new output, or refuse to resume one made with other arguments."""
    path = out / ENCODE_ARGS
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diffs:
            said = "; ".join(f"{k} was {old.get(k)!r}, now {identity.get(k)!r}" for k in diffs[:3])
            raise UserError(f"{out}: started with different arguments ({said}); rerun with the original "
                            "arguments to resume, or choose another output folder")
        return
    if out.is_file():
        raise UserError(f"{out}: is a file; encode-dataset writes a folder")
    # Another rank may have just written the arguments file (identical content) or data/.
    if out.is_dir() and any(p.name not in (ENCODE_ARGS, "data") and not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"{out}: exists and is not an encode-dataset output; choose a new or empty folder")
    write_json(path, identity)


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


def write_shard(path: Path, rows: list[dict[str, Any]], features: Any) -> None:
    """Write one shard's rows (sorted by input index) as an Arrow IPC stream, atomically."""
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
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)


def shard_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def bucket_histogram(files: list[Path]) -> dict[str, int]:
    """Rows per bucket over the shards, ``{"HxW": count}`` in order of aspect ratio (width / height)."""
    import pyarrow as pa

    counts: dict[tuple[int, int], int] = {}
    for path in files:
        with pa.memory_map(str(path)) as source:
            for h, w in pa.ipc.open_stream(source).read_all().column("bucket").to_pylist():
                counts[(h, w)] = counts.get((h, w), 0) + 1
    return {f"{h}x{w}": counts[(h, w)] for h, w in sorted(counts, key=lambda s: (s[1] / s[0], s[0]))}


def finalize(out: Path, identity: dict[str, Any], features: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Write the dataset files if every shard is present; return the metadata (None: shards missing).

    Safe to run in several processes at once: the content is a pure function of the shards, and
    every file is replaced atomically. ``sdvae_latents.json`` comes last, so its presence means complete.
    """
    num_shards = identity["num_shards"]
    files = [shard_path(out, k) for k in range(num_shards)]
    if not all(f.is_file() for f in files):
        return None
    skipped = []
    for k in range(num_shards):
        if skip_path(out, k).is_file():
            skipped.extend(json.loads(skip_path(out, k).read_text()))
    rows = sum(shard_rows(f) for f in files)
    meta = {**meta, "rows": rows, "skipped": len(skipped), "num_shards": num_shards,
            "preview_rgb": combined_rgb_fit(out, num_shards)}
    if "buckets" in meta:
        meta["bucket_histogram"] = bucket_histogram(files)
    with atomic_file(out / "skipped.txt") as tmp:
        tmp.write_text("".join(f"{s['name']}\t{' '.join(s['reason'].split())}\n" for s in skipped))
    info = {"citation": "", "description": json.dumps(meta, sort_keys=True), "features": features.to_dict(),
            "homepage": "", "license": "", "dataset_size": sum(f.stat().st_size for f in files)}
    write_json(out / "dataset_info.json", info)
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    write_json(out / "state.json", {
        "_data_files": [{"filename": f"data/{f.name}"} for f in files], "_fingerprint": fingerprint,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None})
    for leftover in (out / "data").glob(".shard-*.tmp"):  # from killed writers; every shard is final now
        leftover.unlink(missing_ok=True)
    write_json(out / DATASET_META, meta)
    return meta
