"""``ResumableSampler``: which images each process gets at each step, a pure function of (seed, step, rank)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sdvae.errors import UserError
from sdvae.seeding import seeded_generator


class ResumableSampler:
    """Infinite, per-process index batches that can start at any global step.

    Each epoch is a seeded permutation of ``range(num_items)``; global batches of
    ``batch_size * world_size`` are cut from it and rank ``r`` takes slice ``[r*B, (r+1)*B)``, so ranks
    are disjoint and together cover exactly the 1-process global batch.

    * ``drop_last=True``: each epoch has ``num_items // global_batch`` steps; the remainder of the
      permutation (different images every epoch) is dropped.
    * ``drop_last=False``: epochs are concatenated into one stream, so a batch may straddle two
      epochs and no image is ever dropped (works even when ``num_items < global_batch``).

    Resuming is exact because batch ``k`` is a pure function of (seed, k): a resumed run constructs
    the sampler with ``start_step=k``. There is deliberately no "how far have I iterated" state: with
    DataLoader workers prefetching, the sampler runs ahead of the training loop, so only the training
    loop's step count is a correct resume position.

    Yields:
        lists of ``batch_size`` ``(epoch, k)`` keys for :class:`TrainDataset`.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, start_step: int = 0):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if num_items <= 0:
            raise UserError("no training images")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        if drop_last and num_items < self.global_batch:
            raise UserError(f"{num_items} training images is less than one global batch "
                            f"({batch_size} per process × {world_size} processes)")
        self.start_step = start_step
        self._perms: dict[int, list[int]] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Global steps per pass over the data (fractional with ``drop_last=False``)."""
        if self.drop_last:
            return self.num_items // self.global_batch
        return self.num_items / self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (a pure function of (seed, epoch))."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # steps advance monotonically: keep the current and the next epoch
                self._perms.pop(min(self._perms))
            generator = seeded_generator(self.seed, "epoch", epoch)
            self._perms[epoch] = torch.randperm(self.num_items, generator=generator).tolist()
        return self._perms[epoch]

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """All ranks' keys for global step ``step``, rank 0's first."""
        g, n = self.global_batch, self.num_items
        if self.drop_last:
            epoch, b = divmod(step, self.num_items // g)
            perm = self.permutation(epoch)
            return [(epoch, perm[j]) for j in range(b * g, (b + 1) * g)]
        out = []
        for p in range(step * g, (step + 1) * g):
            epoch, j = divmod(p, n)
            out.append((epoch, self.permutation(epoch)[j]))
        return out

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """This rank's keys for global step ``step``."""
        b = self.batch_size
        return self.global_batch_at(step)[self.rank * b:(self.rank + 1) * b]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1
