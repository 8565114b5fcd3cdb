"""The one exception type that means "the user gave us something we cannot use".

The CLI turns a :class:`UserError` into one line on stderr and a non-zero exit code, never a
traceback. Library code raises it for bad input (missing files, unreadable images, unknown model
references); genuine bugs keep raising ordinary exceptions so they stay visible.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is a complete one-line message naming the culprit."""
