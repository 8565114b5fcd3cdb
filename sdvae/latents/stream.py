"""``LatentStream``: a latent dataset read shard by shard, for datasets too large to list or index, on many ranks.

Shards (the metadata's ``shard_files``, in order) are dealt to ranks and DataLoader workers: global worker
g = rank · W + worker_id (W: the loader's ``num_workers``, 1 without workers) streams the shards s with
s mod (world_size · W) = g, in order, row by row, so the ranks' workers together read every row once.

Resuming at a sample count: a DataLoader takes batches from its workers round robin (w0, w1, ..., skipping
workers that have finished), each worker batching its own rows. Given the batch size B, W and the rows per
shard (``shard_rows``), the number of batches a rank has consumed therefore fixes how many came from each
worker and which worker was next (:func:`resume_state`). With ``skip_batches=n`` each worker's rows resume
after the consumed ones, the workers' parts rotated so that the new loader's worker 0 carries the worker that
was next: the loader goes on exactly where the interrupted one stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from sdvae.errors import UserError
from sdvae.latents.dataset import LatentItems
from sdvae.latents.stored_rows import LatentShards


def resume_state(worker_rows: Sequence[int], batch_size: int, batches: int,
                 drop_last: bool = False) -> tuple[list[int], int]:
    """Where each worker stood when a DataLoader had yielded ``batches`` batches, round robin over its workers.

    Args:
        worker_rows: rows each worker streams in all (worker order).
        batch_size: the loader's batch size.
        batches: batches the loader yielded (more than it has: every row).
        drop_last: the loader's ``drop_last`` (a worker's last partial batch is then never yielded).

    Returns:
        (rows each worker had delivered: its batches times ``batch_size``, at most its rows; the worker whose
        batch came next). A new loader asks worker 0 first, so its worker i takes over the rows of worker
        (next + i) mod W: the round robin then goes on in the interrupted order.
    """
    counts = [r // batch_size if drop_last else -(-r // batch_size) for r in worker_rows]
    # The largest number of full rounds r with sum(min(count, r)) <= batches; then the next round's workers in order.
    lo, hi = 0, max(counts, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) <= batches:
            lo = mid
        else:
            hi = mid - 1
    done = [min(c, lo) for c in counts]
    left, last = batches - sum(done), -1
    for w, c in enumerate(counts):
        if left > 0 and c > lo:
            done[w], left, last = done[w] + 1, left - 1, w
    if last < 0 and lo > 0:  # no partial round: the last batch was the last one of round lo - 1
        last = max(w for w, c in enumerate(counts) if c >= lo)
    consumed = [min(d * batch_size, r) for d, r in zip(done, worker_rows, strict=True)]
    return consumed, (last + 1) % max(len(counts), 1)


class LatentStream(LatentItems, IterableDataset):
    """The rows of an ``sdvae encode-dataset`` output (either layout, local or URL), streamed in shard order.

    Items are :class:`~sdvae.latents.dataset.LatentDataset`'s (same seeding, flips and scaling). Wrap it as
    ``DataLoader(stream, batch_size=B, num_workers=W)`` with the same B as ``batch_size`` here. Which rows
    each rank and worker reads: the module docstring. Rows are not shuffled (shuffle at encode time, or
    buffer downstream); every rank should have about as many rows, so use many more shards than ranks × workers.

    To resume after ``n`` batches on this rank, pass ``skip_batches=n`` (and the same B, W, ranks and
    ``drop_last``): the next batches are exactly those the interrupted loader would have yielded. The skip
    applies to every iteration: set ``stream.skip_batches = 0`` before the next epoch.

    Args:
        path_or_url: the output folder or URL of ``sdvae encode-dataset``.
        rank, world_size: this process's place (None: ``RANK``/``WORLD_SIZE`` from the environment, else 0/1).
        batch_size: the DataLoader's batch size (used only to resume).
        skip_batches: batches this rank already consumed.
        drop_last: the DataLoader's ``drop_last`` (used only to resume).
        seed, scaled, sample, scaling, columns, flip: as for :class:`~sdvae.latents.dataset.LatentDataset`.

    Raises:
        UserError: not a finished latent dataset, or bad rank/world size.
    """

    def __init__(self, path_or_url: str | os.PathLike[str], *, rank: int | None = None,
                 world_size: int | None = None, batch_size: int = 1, skip_batches: int = 0, drop_last: bool = False,
                 seed: int = 0, scaled: bool = True, sample: bool = True,
                 scaling: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 columns: Sequence[str] | None = None, flip: str = "random"):
        self.shards = LatentShards(os.fspath(path_or_url))
        super().__init__(self.shards.meta, self.shards.where, seed=seed, scaled=scaled, sample=sample,
                         scaling=scaling, columns=columns, flip=flip)
        if rank is None or world_size is None:
            try:
                env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            except ValueError:
                raise UserError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} in "
                                "the environment are not numbers") from None
            rank = env_rank if rank is None else rank
            world_size = env_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise UserError(f"bad rank {rank} for world size {world_size} (RANK/WORLD_SIZE in the environment?)")
        if batch_size < 1 or skip_batches < 0:
            raise ValueError(f"batch_size must be >= 1 and skip_batches >= 0, got {batch_size}, {skip_batches}")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.skip_batches, self.drop_last = batch_size, skip_batches, drop_last

    def worker_shards(self, worker_id: int, num_workers: int) -> list[int]:
        """The shards worker ``worker_id`` of this rank's ``num_workers`` streams, in order."""
        step = self.world_size * num_workers
        return list(range(self.rank * num_workers + worker_id, len(self.shards.files), step))

    def resume_plan(self, num_workers: int) -> tuple[list[int], int]:
        """:func:`resume_state` after ``skip_batches`` batches of this rank's ``num_workers`` workers."""
        if not self.skip_batches:
            return [0] * num_workers, 0
        rows = self.shards.shard_rows()
        worker_rows = [sum(rows[s] for s in self.worker_shards(w, num_workers)) for w in range(num_workers)]
        return resume_state(worker_rows, self.batch_size, self.skip_batches, self.drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumed, first = self.resume_plan(num_workers)
        part = (first + worker_id) % num_workers  # the original worker whose rows this one carries on
        skip = consumed[part]
        known = self.shards.shard_rows() if skip else None
        for s in self.worker_shards(part, num_workers):
            if known is not None and skip >= known[s]:  # a whole shard already consumed: not even opened
                skip -= known[s]
                continue
            for stored, row in self.shards.iter_rows(s, self.latent_columns, self.carried, skip=skip):
                yield self.make_item(stored, row)
            skip = 0
