"""Which device a command runs on: the one rule behind every ``--device`` default.

``cuda`` when a CUDA device is available, else ``cpu``; under ``torchrun``/``accelerate launch`` each
process takes ``cuda:LOCAL_RANK``. A requested CUDA device on a machine without one is one line, not a
traceback from the first tensor moved there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdvae.errors import UserError

if TYPE_CHECKING:  # torch loads lazily so importing this module stays cheap
    import torch


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (the test every default below is made of)."""
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str | None = None, local_rank: int | None = None) -> torch.device:
    """The device to run on.

    Args:
        requested: ``--device`` as given (``cpu``, ``cuda``, ``cuda:1``, ...), or None for the default.
        local_rank: this process's local rank under a launcher; the default CUDA device is then
            ``cuda:local_rank`` (None: ``cuda``, the current device).

    Raises:
        UserError: CUDA requested but unavailable, or a device string torch does not know.
    """
    import torch

    if requested is None:
        if not cuda_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested}: not a device torch knows (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not cuda_available():
        raise UserError(f"--device {requested} requested but no CUDA device is available")
    return device
