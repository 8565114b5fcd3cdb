"""References as strings, with no I/O: a *ref* is a local path or a URL ``scheme://...``.

``file://`` URLs count as local. What messages show of a ref is :func:`redact`'s output: no
``user:password@`` and no query string (signed URLs carry their signature there; see :func:`strip_query`).
"""

from __future__ import annotations

import os
import re

# scheme:// (fsspec chains such as "simplecache::s3://..." included)
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*::)*([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme(ref: str) -> str:
    """The protocol of ``ref`` in lower case (``"s3"``, ``"https"``...; ``"file"`` for local paths)."""
    match = _URL.match(ref)
    return match.group(1).lower() if match else "file"


def is_url(ref: str) -> bool:
    """Whether ``ref`` is a remote URL (``scheme://...``); local paths and ``file://`` URLs are not."""
    return scheme(ref) != "file"


def local_path(ref: str) -> str:
    """The local path of a local ref: ``file://`` removed, ``~`` expanded."""
    if ref.lower().startswith("file://"):
        ref = ref[len("file://"):]
    return os.path.expanduser(ref)


def strip_query(ref: str) -> str:
    """A URL without its query string. Outside http(s), ``?`` starts one only before a ``key=value`` (so a glob
    such as ``s3://b/0000?.tar`` keeps its ``?``)."""
    if not is_url(ref) or "?" not in ref:
        return ref
    head, query = ref.split("?", 1)
    return head if scheme(ref) in ("http", "https") or "=" in query else ref


def redact(ref: str) -> str:
    """``ref`` as messages may show it: without ``user:password@`` and without any query string."""
    match = _URL.match(ref)
    if not match:
        return ref
    ref = strip_query(ref)
    head, rest = ref[:match.end()], ref[match.end():]
    authority = rest.split("/", 1)[0]
    if "@" in authority:  # standard userinfo
        rest = rest.split("@", 1)[1]
    elif ":" in authority and "@" in rest and not authority.split(":", 1)[1].isdigit():
        # "key:secret/with/slashes@bucket/...": a secret key may hold "/" (a port is digits only)
        rest = rest.split("@", 1)[1]
    return head + rest


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended: :func:`os.path.join` for local refs, ``/``-joined for URLs (no doubled
    slashes, ``s3://bucket`` + ``x`` → ``s3://bucket/x``)."""
    if not is_url(base):
        return os.path.join(base, *parts)
    out = base
    for part in parts:
        part = part.strip("/")
        if part:
            out = (out if out.endswith("/") else out + "/") + part
    return out


def parent(ref: str) -> str:
    """The folder holding ``ref`` (a URL's part before its last ``/``; query string dropped)."""
    if not is_url(ref):
        return os.path.dirname(ref)
    match = _URL.match(ref)
    assert match is not None
    head, rest = ref[:match.end()], strip_query(ref)[match.end():].rstrip("/")
    return head + rest.rsplit("/", 1)[0] if "/" in rest else head + rest


def basename(ref: str) -> str:
    """The last component of ``ref`` (query string dropped)."""
    if not is_url(ref):
        return os.path.basename(ref)
    return strip_query(ref).rstrip("/").rsplit("/", 1)[-1]
