"""sdvae.device: the one rule behind every --device default, and its one-line errors."""

from __future__ import annotations

import pytest
import torch

import sdvae.device
from sdvae.device import resolve_device
from sdvae.errors import UserError


@pytest.mark.parametrize(("cuda", "local_rank", "expected"), [
    (False, None, "cpu"), (False, 3, "cpu"), (True, None, "cuda"), (True, 0, "cuda:0"), (True, 2, "cuda:2")])
def test_default_device(monkeypatch: pytest.MonkeyPatch, cuda: bool, local_rank: int | None, expected: str) -> None:
    monkeypatch.setattr(sdvae.device, "cuda_available", lambda: cuda)
    assert resolve_device(None, local_rank) == torch.device(expected)


def test_requested_device_is_kept_or_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdvae.device, "cuda_available", lambda: False)
    assert resolve_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(UserError, match=r"^--device cuda:1 requested but no CUDA device is available$"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match=r"^--device gpu0: not a device torch knows"):
        resolve_device("gpu0")
    monkeypatch.setattr(sdvae.device, "cuda_available", lambda: True)
    assert resolve_device("cuda:1", 0) == torch.device("cuda:1")  # an explicit choice beats the rank's default
