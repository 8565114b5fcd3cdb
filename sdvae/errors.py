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


class WriteError(UserError, OSError):
    """The file system refused a write (disk full, read-only, quota...): ``"PATH: cannot write (REASON)"``.

    Both a :class:`UserError` (the CLI prints one line, exit 2) and an :class:`OSError` (``errno`` is
    the original's, so callers can tell ENOSPC from EROFS).
    """

    def __init__(self, path: object, err: OSError, note: str = "") -> None:
        reason = err.strerror or first_line(err, with_type=True)
        super().__init__(err.errno, reason, str(path))
        self.message = f"{path}: cannot write ({reason})" + (f"; {note}" if note else "")

    def __str__(self) -> str:
        return self.message


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


# Optional parts of sdvae and the pip extra that brings each module (see pyproject.toml).
EXTRAS = {
    "datasets": "data", "pyarrow": "data",
    "accelerate": "train", "tensorboard": "train", "yaml": "train",
    "lpips": "eval", "torchvision": "eval", "torch_fidelity": "eval",
}


def require_extra(module: str, what: str, extra: str | None = None) -> None:
    """Raise a one-line :class:`UserError` naming the pip extra to install when ``module`` is missing.

    Args:
        module: top-level module name (``"datasets"``, ``"torch_fidelity"``...).
        what: what needs it, for the message (``"sdvae encode-dataset"``).
        extra: the extra that brings it (default: :data:`EXTRAS`).
    """
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        extra = extra or EXTRAS.get(module, "all")
        raise UserError(f"{what} needs the optional package {module!r}, which is not installed: "
                        f"pip install 'sdvae[{extra}]'")
