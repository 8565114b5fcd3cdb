"""``BucketBatchSampler``: same-shape batches of a latent dataset, seeded, rank-sharded and resumable.

A bucketed ``encode-dataset`` output (``--buckets``) holds latents of several shapes; a diffusion
model can only stack latents of one shape. This sampler groups rows by shape and yields batches of
row positions for a ``DataLoader(dataset, batch_sampler=...)``, in the spirit of
:class:`sdvae.train.sampler.ResumableSampler`: everything is a pure function of (seed, epoch, rank).

Epoch ``e`` (generator seeded by (seed, e)):

1. each bucket's rows are shuffled and cut into batches of ``batch_size`` (shuffled *within*
   buckets); what is left over (fewer than ``batch_size`` rows) is handled by ``partial``:
   ``"drop"`` (default) drops it — other rows each epoch, since the shuffle changes — and
   ``"keep"`` keeps it as one smaller batch, still of one shape. A bucket with fewer rows than one
   batch is therefore never used with ``"drop"`` (:attr:`unused_buckets` lists them) and forms one
   short batch per epoch with ``"keep"``. Batches are never merged across shapes: a latent cannot be
   re-cropped to another aspect ratio without re-encoding.
2. the batches of all buckets are shuffled together (shuffled *across* buckets);
3. the list is cut to a multiple of ``world_size`` (the last ``len % world_size`` batches, different
   ones each epoch, are dropped) and rank ``r`` takes batches ``r, r + W, r + 2W, …``: ranks are
   disjoint and all have exactly :meth:`__len__` batches, so no rank waits for another at the end.

Resuming: batch ``k`` of epoch ``e`` is a pure function of (seed, e, k, rank), so a run stopped after
``k`` batches continues with ``set_epoch(e)`` and ``start_batch=k`` (or, as one stream over epochs,
:meth:`stream` from the global step), exactly as if it had never stopped.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch

from sdvae.errors import UserError
from sdvae.seeding import seeded_generator

PARTIAL = ("drop", "keep")


class BucketBatchSampler:
    """Batches of row positions whose rows share one shape.

    Args:
        shapes: one hashable shape per row of the dataset (e.g. :meth:`LatentDataset.shapes`).
        batch_size: rows per batch (the last batch of a bucket may be smaller with ``partial="keep"``).
        seed: seed of the shuffles.
        rank, world_size: this process and the process count.
        partial: ``"drop"`` or ``"keep"`` a bucket's incomplete last batch (see the module docstring).
        indices: the row positions to sample from (default: all; e.g. a training split).
        start_batch: the first batch the next iteration yields (resuming mid-epoch).
    """

    def __init__(self, shapes: Sequence[Hashable], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, partial: str = "drop", indices: Sequence[int] | None = None,
                 start_batch: int = 0):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if partial not in PARTIAL:
            raise ValueError(f"partial must be one of {PARTIAL}, got {partial!r}")
        buckets: dict[Hashable, list[int]] = {}
        for i in range(len(shapes)) if indices is None else indices:
            buckets.setdefault(tuple(shapes[i]) if isinstance(shapes[i], list) else shapes[i], []).append(int(i))
        # A fixed bucket order (sorted by shape), so that the shuffles do not depend on the row order.
        self.buckets = dict(sorted(buckets.items(), key=lambda kv: repr(kv[0])))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.partial, self.start_batch, self.epoch = partial, start_batch, 0
        per_bucket = [len(v) // batch_size + (partial == "keep" and len(v) % batch_size > 0)
                      for v in self.buckets.values()]
        self.batches_per_rank = sum(per_bucket) // world_size
        if self.batches_per_rank == 0:
            raise UserError(f"{sum(map(len, self.buckets.values()))} rows in {len(self.buckets)} shape bucket(s) "
                            f"make fewer than one batch of {batch_size} per process ({world_size} processes)")

    @property
    def unused_buckets(self) -> list[Hashable]:
        """Shapes with fewer rows than one batch: never sampled with ``partial="drop"``."""
        if self.partial == "keep":
            return []
        return [shape for shape, rows in self.buckets.items() if len(rows) < self.batch_size]

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from now on (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch``, in order (a pure function of (seed, epoch, rank))."""
        generator = seeded_generator(self.seed, "bucket-batches", epoch)
        batches: list[list[int]] = []
        for rows in self.buckets.values():
            order = [rows[j] for j in torch.randperm(len(rows), generator=generator).tolist()]
            full = len(rows) - len(rows) % self.batch_size
            batches.extend(order[i:i + self.batch_size] for i in range(0, full, self.batch_size))
            if self.partial == "keep" and full < len(rows):
                batches.append(order[full:])
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
        used = self.batches_per_rank * self.world_size
        return batches[self.rank:used:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, from ``start_batch`` (reset to 0 afterwards)."""
        start, self.start_batch = self.start_batch, 0
        yield from self.epoch_batches(self.epoch)[start:]

    def stream(self, start_step: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Endless ``(epoch, batch)`` pairs over consecutive epochs, from global step ``start_step``.

        Step ``s`` is batch ``s % len(self)`` of epoch ``s // len(self)``: a training loop that
        resumes at its step count continues exactly where it stopped.
        """
        epoch, k = divmod(start_step, self.batches_per_rank)
        while True:
            for batch in self.epoch_batches(epoch)[k:]:
                yield epoch, batch
            epoch, k = epoch + 1, 0
