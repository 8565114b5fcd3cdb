"""Seeded, order-independent random streams: one generator per (seed, purpose, index...)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints/strings (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A private ``torch.Generator`` seeded by :func:`mix_seed` of ``parts`` (never the global RNG)."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def seed_global_rngs(seed: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs (a run's checkpoints then hold the same RNG states
    whether or not it was interrupted; unseeded, Python's and numpy's start from OS entropy)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
