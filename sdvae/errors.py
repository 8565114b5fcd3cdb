"""The one exception type that means "the user gave us something we cannot use".

The CLI turns a :class:`UserError` into one line on stderr and a non-zero exit code, never a
traceback. Library code raises it for bad input (missing files, unreadable images, unknown model
references); genuine bugs keep raising ordinary exceptions so they stay visible.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is a complete one-line message naming the culprit."""


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
