"""The one translation from a file-system failure (local or fsspec: s3fs, gcsfs, http, hf) to a one-line
:class:`sdvae.errors.UserError` that starts with the redacted ref and never shows a secret.

Libraries wrap their errors differently (s3fs turns botocore's ``ClientError`` into ``PermissionError`` /
``FileNotFoundError`` with the original as ``__cause__``; aiohttp and botocore have their own connection
errors), so the error's class names along its cause chain decide, without importing any of them.
"""

from __future__ import annotations

import os
import re

from sdvae.errors import UserError, first_line
from sdvae.storage.urls import redact, scheme

_UNREACHABLE = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
    "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "TimeoutError", "FSTimeoutError",
    "gaierror",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "Forbidden", "401", "403"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY$|_KEY_ID$", re.IGNORECASE)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes/contexts, outermost first."""
    out: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in out and len(out) < 16:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def _code(err: BaseException) -> str:
    """The service's error code of a botocore ``ClientError`` or an HTTP status ("" if none)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    status = getattr(err, "status", None) or getattr(err, "status_code", None)
    return str(status) if isinstance(status, int) else ""


def _endpoint(ref: str, chain: list[BaseException]) -> str:
    for err in chain:
        kwargs = getattr(err, "kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
            url = str(kwargs["endpoint_url"])
            match = re.match(r"^[a-z0-9+.\-]+://[^/?]+", url, re.IGNORECASE)  # the server, not the request path
            return redact(match.group(0) if match else url)
    proto = scheme(ref)
    if proto in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL")):
        return redact(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"])
    match = re.match(r"^[a-z0-9+.\-]+://[^/?]+", redact(ref), re.IGNORECASE)
    return match.group(0) if match else redact(ref)


def _reason(chain: list[BaseException]) -> str:
    """Why a connection failed: the innermost OS-level reason, else the last message in the chain."""
    for err in reversed(chain):
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
    return first_line(chain[-1], with_type=True)


def scrub(text: str) -> str:
    """``text`` with the value of every secret-looking environment variable replaced by ``***``."""
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def translate(ref: str, err: BaseException) -> UserError:
    """The one-line :class:`UserError` for ``err`` raised while using ``ref``: ``"REF: problem"``.

    ``ref`` is shown redacted; a :class:`UserError` is returned unchanged. Categories: missing file or bucket,
    access denied, no credentials, endpoint unreachable, anything else with the library's first line.
    """
    if isinstance(err, UserError):
        return err
    where = redact(ref)
    chain = _chain(err)
    names = set().union(*map(_names, chain))
    codes = {_code(e) for e in chain} - {""}
    if names & _NO_CREDENTIALS:
        hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE" if scheme(ref).startswith("s3")
                else "set the provider's credentials")
        message = f"no credentials found ({hint} in the environment)"
    elif isinstance(err, PermissionError) or codes & _DENIED_CODES:
        message = "access denied (check the credentials in the environment)"
    elif isinstance(err, FileNotFoundError) or codes & _MISSING_CODES:
        text = " ".join(str(e) for e in chain).lower()
        message = "no such bucket" if "bucket" in text else "no such file"
    elif isinstance(err, IsADirectoryError):
        message = "is a folder, not a file"
    elif names & _UNREACHABLE:
        message = f"cannot reach {_endpoint(ref, chain)}: {_reason(chain)}"
    else:
        message = first_line(err, with_type=True)
    return UserError(scrub(f"{where}: {message}"))
