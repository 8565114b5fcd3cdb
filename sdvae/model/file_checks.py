"""Structural checks of a ``.safetensors`` file, made before any library parses it.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name →
``dtype``, ``shape``, ``data_offsets`` relative to the data section, plus an optional
``__metadata__`` table of strings), then the data. :func:`check_safetensors` reads only the header and
checks it against the file's length, so a damaged or hostile file is refused with one line naming the
file and the problem, not a library's paragraph (or a huge allocation).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from sdvae.errors import UserError

# Bits per element of every dtype safetensors knows (F4/F6 are packed sub-byte floats).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _fail(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: not a valid .safetensors file: {problem}")


def _entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[int, int]:
    """Check one tensor entry; returns its (begin, end) offsets."""
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r} has no dtype/shape/offsets record")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _fail(path, f"tensor {name!r} has an unknown dtype {str(dtype)[:40]!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise _fail(path, f"tensor {name!r} has an invalid shape {str(shape)[:60]}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor {name!r} has invalid data offsets {str(offsets)[:60]}")
    begin, end = offsets
    if end > data_len:
        raise _fail(path, f"tensor {name!r} runs past the end of the file (ends at data byte {end}, "
                    f"the file holds {data_len}); the file is truncated or damaged")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != (end - begin) * 8:
        raise _fail(path, f"tensor {name!r} holds {end - begin} bytes but shape {shape} × {dtype} needs "
                    f"{bits / 8:g} bytes")
    return begin, end


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read and check a safetensors header against the file; return its tensor records.

    Checks: the file holds a header length and that many bytes; the header is a JSON object; every
    dtype is one safetensors knows; every shape × dtype size equals its byte range; no range runs past
    the end of the file or overlaps another.

    Args:
        path: the file.

    Returns:
        Tensor name → ``{"dtype", "shape", "data_offsets"}`` (``__metadata__`` left out).

    Raises:
        UserError: the file is not a structurally valid safetensors file; the message names it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise _fail(path, "the file is empty")
            if len(head) < 8:
                raise _fail(path, f"only {size} bytes, too short for a header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _fail(path, f"header length {n} is larger than the file ({size} bytes); "
                            "truncated or not a safetensors file")
            if n > MAX_HEADER:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "__metadata__ is not a table of strings")
    data_len = size - 8 - n
    reach, owner = 0, ""  # the furthest end so far, and its tensor
    for (begin, end), name in sorted((_entry(path, name, entry, data_len), name) for name, entry in header.items()):
        if begin < end and begin < reach:  # empty tensors own no bytes and overlap nothing
            raise _fail(path, f"tensors {owner!r} and {name!r} overlap (data bytes {begin}..{min(end, reach)})")
        if end > reach:
            reach, owner = end, name
    return header
