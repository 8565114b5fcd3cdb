"""The one exception type that means "the user gave us something we cannot use", and its message rule.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2, never a traceback. Library
code raises it for bad input (missing files, unreadable images, unknown model references); genuine
bugs keep raising ordinary exceptions so they stay visible.
"""

from __future__ import annotations

MAX_REASON = 300  # characters of a library's message quoted inside one of ours


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is a complete one-line message naming the culprit."""


class MissingWeights(UserError):
    """Network weights that are never downloaded at run time are not on disk (the message says what to fetch).

    Callers for which the network is optional (``sdvae eval``'s LPIPS column) report it as unavailable.
    """


def first_line(err: BaseException, *, with_type: bool = False) -> str:
    """The first line of ``err``'s message, cut to :data:`MAX_REASON` characters, to quote as a reason.

    Library messages run to paragraphs; ours stay one line. An empty message gives the type's name;
    ``with_type`` prefixes it (``"OSError: ..."``) where the type says what went wrong.
    """
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    text = lines[0][:MAX_REASON]
    return f"{type(err).__name__}: {text}" if with_type else text
