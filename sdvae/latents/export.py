"""``sdvae encode-dataset``: encode an image collection into a latent dataset, resumably, on N processes.

:func:`run_encode` is the entry point and the ``torchrun`` engine: this process (or each process of ``torchrun`` /
``accelerate launch``) encodes the units k with k mod world size = its rank, preprocessing in DataLoader workers
overlapped with the model and writing finished units from a background thread. ``--engine ray`` hands the run to
:mod:`sdvae.latents.ray_engine`. What a job and its units are, and why the output is exact under ``kill -9``:
:mod:`sdvae.latents.encode_job`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdvae.errors import UserError
from sdvae.latents.encode_inputs import (
    IndexedItems,
    ShardUnits,
    as_collated,
    collate,
    crop_for_encoding,
    indexed_batches,
    tag_indexed,
)
from sdvae.latents.encode_job import ENGINES, EncodeOptions, Job, complete, dist_env, encode_loop, prepare_job
from sdvae.latents.format import LAYOUTS
from sdvae.progress import Progress
from sdvae.storage.urls import redact

__all__ = ["EncodeOptions", "crop_for_encoding", "run_encode"]


def run_encode(opts: EncodeOptions) -> dict[str, Any]:
    """Encode this process's share of the pending units; complete the dataset if this is the last process.

    With ``engine="ray"`` the whole run goes to :func:`sdvae.latents.ray_engine.run_ray` instead (one driver).

    Returns:
        A summary: ``rank``, ``world_size``, ``encoded`` (images this process encoded), ``unreadable``
        (inputs it could not read; ``images_per_s`` counts both, as both were read),
        ``seconds``, ``images_per_s``, ``waiting_s`` (time the model waited for preprocessed batches),
        ``shards_total``, ``shards_done_before``, ``shards_encoded``,
        ``complete``, and when complete ``rows``/``skipped`` (whole dataset), ``out``.

    Raises:
        UserError: bad arguments, an unusable source/model, or an output made with other arguments.
    """
    from sdvae.device import resolve_device

    if opts.engine not in ENGINES or opts.format not in LAYOUTS:
        raise UserError(f"bad option: engine {opts.engine!r} (one of {', '.join(ENGINES)}) or format "
                        f"{opts.format!r} (one of {', '.join(LAYOUTS)})")
    rank, world, local_rank = dist_env()
    if opts.engine == "ray":
        if world > 1:
            raise UserError("--engine ray runs from one driver process; start it without torchrun (Ray spreads "
                            "the work over the cluster)")
        from sdvae.latents.ray_engine import run_ray

        return run_ray(opts)
    device = resolve_device(opts.device, local_rank)
    job, vae = prepare_job(opts, device)
    mine = list(range(rank, job.num_units, world))
    done = job.done_units()
    pending = [k for k in mine if k not in done]
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "shards_total": job.num_units,
                               "shards_done_before": len(mine) - len(pending), "shards_encoded": 0,
                               "encoded": 0, "unreadable": 0}
    from sdvae.codec.codec import Codec

    codec = Codec(vae, device=device, dtype=job.opts.dtype, tile="auto", compile=job.opts.compile)
    batches, total = _loader(job, pending, device)
    bar = Progress(total, f"encode (rank {rank}/{world})" if world > 1 else "encode",
                   enabled=opts.progress and rank == 0 and bool(pending))
    # Units are written by one background thread (Arrow + fsync release the GIL), so the model does not
    # wait on the disk or the network; at most two finished units wait in memory.
    writer, writing = ThreadPoolExecutor(max_workers=1), deque()

    def submit(*args: Any) -> None:
        writing.append(writer.submit(*args))
        while len(writing) > 2:
            writing.popleft().result()

    notes: list[str] = []
    start = time.perf_counter()
    try:
        encode_loop(batches, codec, job, summary, bar, notes, submit)
    except BaseException:
        _wait_for_writes(writing, writer)  # no write still running when the error reaches the caller
        raise
    failed = _wait_for_writes(writing, writer)
    if failed is not None:
        raise failed
    bar.close()
    seconds = time.perf_counter() - start
    read = summary["encoded"] + summary["unreadable"]
    summary.update(seconds=round(seconds, 3), images_per_s=round(read / seconds, 2) if seconds else 0.0,
                   waiting_s=round(summary["waiting_s"], 3), out=redact(job.out),
                   notes=[*getattr(job.source, "notes", ()), *notes, *codec.notes])
    complete(summary, job)
    return summary


def _loader(job: Job, pending: list[int], device: torch.device) -> tuple[Iterator[dict[str, Any]], int | None]:
    """The tagged batches of the pending units, preprocessed in DataLoader workers; and the image count
    (None for a sharded source: its shards are not counted before they are read)."""
    opts = job.opts
    workers = {"num_workers": opts.num_workers, "prefetch_factor": 4 if opts.num_workers else None,
               "pin_memory": device.type == "cuda"}
    if not pending:  # an empty loader must not start workers
        return iter(()), 0
    if job.sharded:
        units = ShardUnits(job.source, pending, job.prep, opts.batch_size, job.part_size, job.done_parts(pending))
        loader = DataLoader(units, batch_size=None, collate_fn=as_collated,
                            **{**workers, "num_workers": min(opts.num_workers, len(pending))})
        return iter(loader), None
    plan = indexed_batches(pending, job.num_inputs, opts.shard_size, opts.batch_size)
    loader = DataLoader(IndexedItems(job.source, job.prep), batch_sampler=plan, collate_fn=collate, **workers)
    return tag_indexed(iter(loader), plan, opts.shard_size, job.num_inputs), sum(len(b) for b in plan)


def _wait_for_writes(writing: deque, writer: ThreadPoolExecutor) -> BaseException | None:
    """Wait for every shard write handed to ``writer`` (even after one failed); the first failure, if any."""
    failed = None
    while writing:
        try:
            writing.popleft().result()
        except BaseException as err:  # the first one is re-raised by the caller
            failed = failed or err
    writer.shutdown()
    return failed
