"""A checkpoint restores the global torch, numpy and Python RNG streams (the README's promise for resume).

Training draws nothing from these generators itself (its noise and augmentation come from seeded private
generators), so only a test that draws from them can see a missing restore: a user's augmentation, a
library's dropout or a future change drawing from them would otherwise break bit-exact resume silently.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdvae.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


@pytest.fixture(autouse=True)
def _keep_global_rngs() -> Iterator[None]:
    """Leave the global streams as this module found them (other tests' unseeded draws stay as before)."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def _draws() -> dict[str, Any]:
    """Next values of each global stream, including the cached second normals (Python's ``gauss``,
    numpy's legacy ``has_gauss``), which a restore must bring back too."""
    return {
        "torch": torch.rand(5).tolist() + torch.randn(3).tolist() + torch.randint(0, 2**31, (3,)).tolist(),
        "numpy": np.random.random(5).tolist() + np.random.standard_normal(3).tolist()
        + np.random.randint(0, 2**31, 3).tolist(),
        "python": [random.random() for _ in range(5)] + [random.gauss(0, 1) for _ in range(3)]
        + [random.getrandbits(64) for _ in range(3)],
    }


def _advance(seed: int) -> None:
    """Move every stream to an arbitrary point, with a normal pending in numpy's and Python's caches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _draws()


def _assert_repeats(first: dict[str, Any], again: dict[str, Any]) -> None:
    for name in ("torch", "numpy", "python"):
        assert again[name] == first[name], f"the {name} RNG stream was not restored"


def test_rng_state_round_trip_repeats_the_next_draws() -> None:
    """rng_state / set_rng_state (what a checkpoint stores and resume applies) bring every stream back."""
    _advance(11)
    tensors, meta = rng_state()
    first = _draws()
    _advance(12)  # elsewhere in every stream
    set_rng_state(tensors, meta)
    _assert_repeats(first, _draws())


@pytest.mark.parametrize(("save_rank", "load_rank"), [(0, 0), (1, 1), (0, 1)])
def test_checkpoint_files_restore_the_rng_streams(tmp_path: Path, save_rank: int, load_rank: int) -> None:
    """Through the files: save_checkpoint writes this rank's streams, load_checkpoint (as a resume does,
    in a process whose streams are elsewhere) sets them, and the draws after the checkpoint repeat
    (a rank with no file of its own, after resuming with more processes, takes rank 0's)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts: dict[str, Any] = {"modules": {"m": model}, "optimizers": {"m": opt}, "schedulers": {}}
    _advance(21)
    path = save_checkpoint(tmp_path, 5, **parts, extra_tensors={}, meta={}, rank=save_rank, is_main=True)
    first = _draws()
    _advance(22)
    step, _, _ = load_checkpoint(path, **parts, rank=load_rank)
    assert step == 5
    _assert_repeats(first, _draws())
