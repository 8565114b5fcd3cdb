"""``sdvae encode-dataset --engine ray``: the same units, written the same way, by an actor pool of Ray Data.

One driver (this process) checks the options and records the run's identity in OUT (:func:`prepare_job`, so a
bad argument is one line before any actor starts), lists the units not yet written, and hands them to
``ray.data.from_items([{"unit": k}, ...]).map_batches(_UnitEncoder, batch_size=1, compute=<N actors>)``. Each actor
holds the model (``prepare_job`` + :class:`~sdvae.codec.codec.Codec` in its constructor, on its own GPU when
the cluster has GPUs, else on CPUs) and encodes and writes *whole* units with
:func:`~sdvae.latents.encode_job.encode_unit`: a unit's rows are written together, so a unit never spans actors.
The driver only counts what comes back and, at the end, writes the dataset files (:func:`complete`).

Where the images are decoded: **inside the actor**, by its own threads. Each actor runs a few units at once
(``max_concurrent_calls_per_actor``, with Ray Data's ``enable_true_multi_threading``): while one thread's
batch is in the model, the others read, decode and resize theirs (PIL's decoders and torch's resize release
the GIL), so the encoder does not wait for the CPU work, as DataLoader workers do for the torchrun engine.
Model calls are serialised by a lock (one batch on the device at a time, no extra device memory), and each
thread holds its own copy of the source (sources are picklable for DataLoader workers; a sharded source
appends its notes as it streams, so a shared one would mix units' notes). Separate Ray CPU tasks were the
alternative, and they do not fit cleanly: a unit is written by the one process that encoded all its images, so
its decoded pixels (float32, ~12 bytes a pixel) would all travel through the object store to that actor before
it could start, or the rows of a unit would have to be regrouped after encoding, which holds every row until
the end of the run and loses the per-unit resume.

Why a failure loses and duplicates nothing: a unit is written atomically and idempotently (the same unit
written twice has the same content: seeded by input index, see :mod:`sdvae.latents.encode_job`). A worker that
dies (killed, OOM, node lost) is restarted by Ray and its unit retried (Ray Data's defaults for actor pools,
``max_restarts`` and ``max_task_retries`` -1), and the retry writes what the lost attempt would have; a killed
driver takes its actors with it and a rerun skips the units whose rows file exists. Bad input that stops a run
(a missing shard, an unreadable model on a worker) is a :class:`UserError` in the actor; it comes back as
data, never as a Ray traceback, and the driver raises it as the same one line (finished units stay in place).

Where it runs: ``ray.init()`` connects to the cluster named by ``RAY_ADDRESS`` or started on this machine with
``ray start --head``, else starts a local instance (Ray's own rule; unlike ``address="auto"`` it never
attaches to some other local Ray process found by name). Ray must be installed on every node, with sdvae.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from sdvae.errors import UserError
from sdvae.latents.encode_job import EncodeOptions, Job, complete, encode_unit, prepare_job
from sdvae.progress import Progress
from sdvae.storage.urls import redact

__all__ = ["run_ray"]

MAX_DECODE_THREADS = 8  # units one GPU actor reads and decodes at once, at most (one per CPU it has)
CPU_DECODE_THREADS = 2  # ... and a CPU actor: the model is its bottleneck, one unit decoding while one encodes


def run_ray(opts: EncodeOptions) -> dict[str, Any]:
    """Encode every pending unit of ``opts`` on Ray actors and complete the dataset.

    Args:
        opts: the run's options (``engine`` is ``ray``; ``num_workers`` does not apply: actors decode in threads).

    Returns:
        :func:`~sdvae.latents.export.run_encode`'s summary for the whole run (``rank`` 0, ``world_size`` 1),
        plus ``engine`` (``"ray"``) and ``ray_workers`` (actors started; 0 when no unit was pending).
        ``seconds`` includes the actors' start (imports, model load); ``waiting_s`` adds up, over the actors,
        the time their model sat idle between two batches (none of them decoded yet).

    Raises:
        UserError: Ray missing, bad arguments, an unusable source/model, or bad input met by a worker.
    """
    import torch

    from sdvae.device import resolve_device

    ray = _import_ray()
    workers = _requested_workers(opts.ray_workers)
    started = False
    try:
        if ray.is_initialized() or _cluster_address() is not None:  # a running cluster: ask it what it has
            started = _connect(ray)
            use_gpu = _cluster_gpu_choice(ray, opts.device)
            # The dtype the actors' device gives "auto"; the model only loads here (on CPU) to be checked.
            job = _prepare_on_driver(dataclasses.replace(opts, dtype=_worker_dtype(ray, opts.dtype, use_gpu)),
                                     torch.device("cpu"))
        else:  # a local instance runs on this machine: decide and check everything before starting it
            device = resolve_device(opts.device)
            use_gpu = device.type == "cuda"
            job = _prepare_on_driver(opts, device)
        done = job.done_units()
        pending = [k for k in range(job.num_units) if k not in done]
        summary: dict[str, Any] = {"rank": 0, "world_size": 1, "shards_total": job.num_units,
                                   "shards_done_before": len(done), "shards_encoded": 0, "encoded": 0,
                                   "unreadable": 0, "waiting_s": 0.0, "engine": "ray", "ray_workers": 0}
        notes: list[str] = list(getattr(job.source, "notes", ()))  # met by the driver's look at the source
        if pending and not ray.is_initialized():
            started = _connect(ray)
        start = time.perf_counter()  # actors' start-up (imports, model load) included, Ray's own not
        if pending:
            summary["ray_workers"] = _encode_on_actors(ray, job, pending, use_gpu, workers, summary, notes)
        seconds = time.perf_counter() - start
        read = summary["encoded"] + summary["unreadable"]
        summary.update(seconds=round(seconds, 3), images_per_s=round(read / seconds, 2) if seconds else 0.0,
                       notes=list(dict.fromkeys(notes)), out=redact(job.out))  # each note once, in order
        complete(summary, job)
        return summary
    finally:
        if started:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # ray[data]: the extra brings both
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'sdvae[ray]'") from None
    return ray


def _requested_workers(workers: int | None) -> int | None:
    """The number of actors asked for (``--ray-workers``); None: the default (one per GPU, or 1)."""
    if workers is None:
        return None
    if workers < 1:
        raise UserError(f"--ray-workers must be >= 1 (got {workers})")
    return workers


def _cluster_address() -> str | None:
    """The running cluster ``ray.init()`` would connect to (``RAY_ADDRESS``, or ``ray start`` on this machine);
    None: it would start a local instance."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None)
    except (ImportError, AttributeError, TypeError):  # Ray moved its rule: keep the documented half of it
        return os.environ.get("RAY_ADDRESS") or None
    except (ValueError, ConnectionError) as err:
        raise UserError(f"Ray cluster address: {err}") from None


def _connect(ray: Any) -> bool:
    """Connect to the cluster (or start a local instance) unless this process already did; True if it did."""
    if ray.is_initialized():
        return False
    import logging

    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster ({' '.join(str(err).split())[:300]})") from None
    return True


def _cluster_gpu_choice(ray: Any, device: str | None) -> bool:
    """Whether the actors run on GPUs: ``--device`` cpu/cuda, or by default whether the cluster has any."""
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if device is None:
        return has_gpus
    if device.startswith("cuda") and not has_gpus:
        raise UserError(f"--device {device}: the Ray cluster has no GPU")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: with --engine ray use cpu or cuda (each actor gets its own GPU)")
    return device.startswith("cuda")


def _worker_dtype(ray: Any, dtype: str, use_gpu: bool) -> str:
    """``--dtype`` as the actors' device resolves it; ``auto`` on GPUs is asked of a GPU worker (the driver
    may have none), so the identity this driver records is the one every actor checks."""
    if dtype != "auto":
        return dtype
    if not use_gpu:
        from sdvae.model.dtypes import resolve_dtype

        return resolve_dtype("auto", "cpu")
    return str(ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_dtype).remote()))


def _gpu_dtype() -> str:
    from sdvae.model.dtypes import resolve_dtype

    return resolve_dtype("auto", "cuda")


def _prepare_on_driver(opts: EncodeOptions, device: Any) -> Job:
    """Check everything and record the run's identity once, before any actor; the model is released again."""
    job, vae = prepare_job(opts, device)
    del vae
    return job


def _actor_resources(ray: Any, workers: int, use_gpu: bool) -> tuple[float, float]:
    """(CPUs, GPUs) each actor asks for: one GPU each, and the CPUs shared out so all ``workers`` fit
    (never more than one node has; an actor's torch threads are its whole CPUs)."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if use_gpu:
        per_gpu = [r.get("CPU", 0) / r["GPU"] for r in nodes if r.get("GPU", 0) >= 1]
        return max(1.0, float(int(min(per_gpu, default=1.0)))), 1.0
    cpus = total.get("CPU", 1.0)
    per_node = max((r.get("CPU", 0) for r in nodes), default=cpus)
    share = cpus / workers
    return (min(float(int(share)), per_node) if share >= 1 else share), 0.0


def _encode_on_actors(ray: Any, job: Job, pending: list[int], use_gpu: bool, workers: int | None,
                      summary: dict[str, Any], notes: list[str]) -> int:
    """Run the pending units on an actor pool; add the counts to ``summary``; return the number of actors."""
    from ray.data import ActorPoolStrategy, DataContext

    if workers is None:
        workers = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1
    workers = max(1, min(workers, len(pending)))
    num_cpus, num_gpus = _actor_resources(ray, workers, use_gpu)
    threads = min(MAX_DECODE_THREADS, max(2, int(num_cpus))) if use_gpu else CPU_DECODE_THREADS
    context = DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False  # our own bar below counts units
    bar = Progress(len(pending), "encode (ray)", unit="shard", enabled=job.opts.progress)
    idle: dict[str, float] = {}  # actor → seconds its model waited for a decoded batch
    ds = ray.data.from_items([{"unit": k} for k in pending], override_num_blocks=len(pending))
    # Ray Data's actor pools restart dead actors and retry their tasks by default (max_restarts and
    # max_task_retries -1): what the engine relies on, and what a preempted cluster node needs.
    results = ds.map_batches(
        _UnitEncoder, fn_constructor_kwargs={"opts": job.opts, "device": "cuda" if use_gpu else "cpu",
                                             "threads": max(1, int(num_cpus))},
        batch_size=1, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
        # True multi-threading: Ray Data otherwise runs one call of the class at a time per actor.
        compute=ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=threads,
                                  enable_true_multi_threading=True))
    with _quiet_ray_data():
        rows = results.iter_rows()
        try:
            for row in rows:
                if row["error"]:
                    raise UserError(str(row["error"]))
                summary["shards_encoded"] += 1
                summary["encoded"] += int(row["encoded"])
                summary["unreadable"] += int(row["unreadable"])
                idle[str(row["actor"])] = max(idle.get(str(row["actor"]), 0.0), float(row["idle_s"]))
                notes.extend(json.loads(str(row["notes"])))
                bar.update(1)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # stops the pipeline (and its actors) at once when a unit failed
            context.enable_progress_bars = saved
            bar.close()
    summary["waiting_s"] = round(sum(idle.values()), 3)
    return workers


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's per-run INFO lines (plan, start, finish) and its notice that its bars are off, silenced
    for the run; its warnings (e.g. a pool the cluster cannot fit) still show."""
    import logging

    levels = {"ray.data._internal.execution.streaming_executor": logging.WARNING,
              "ray.data._internal.progress": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class _SerialCodec:
    """The actor's one model, called by one thread at a time (the only part of ``encode_unit`` that touches it);
    counts the seconds it sat idle between batches while no thread had one ready (``idle_s``)."""

    def __init__(self, codec: Any) -> None:
        self.codec, self.lock = codec, threading.Lock()
        self.idle_s, self.released = 0.0, None  # released: when the model last finished (None: not yet)

    def encode(self, images: Any) -> Any:
        """(B,C,H,W) float32 in [-1,1] → the codec's posterior (see :meth:`Codec.encode`)."""
        with self.lock:
            if self.released is not None:
                self.idle_s += time.perf_counter() - self.released
            try:
                return self.codec.encode(images)
            finally:
                self.released = time.perf_counter()

    @property
    def notes(self) -> list[str]:
        return self.codec.notes


class _UnitEncoder:
    """A Ray Data actor: holds the model; ``{"unit": [k]}`` → unit k encoded and written, and its counts.

    Constructed from the options alone (every actor, and every restarted one, calls :func:`prepare_job`,
    which checks the identity the driver recorded). A :class:`UserError` here or in a unit is returned in
    ``error`` (a one-line message) rather than raised, so that the driver can raise it as it is.
    """

    def __init__(self, opts: EncodeOptions, device: str, threads: int) -> None:
        """``device``: ``cuda`` (the GPU Ray gave this actor) or ``cpu``; ``threads``: torch's intra-op threads,
        the CPUs the actor reserved (on CPUs the last bits of a batch's latents depend on it)."""
        self.error = ""
        self.name = uuid.uuid4().hex  # this actor (a restarted one is another): its idle time counts once
        self.local = threading.local()
        try:
            import torch

            from sdvae.codec.codec import Codec
            from sdvae.heap import keep_freed_memory

            keep_freed_memory()  # the actor's process is ours (sdvae/heap.py)
            torch.set_num_threads(threads)
            self.job, vae = prepare_job(opts, torch.device(device))
            codec = Codec(vae, device=device, dtype=self.job.opts.dtype, tile="auto", compile=self.job.opts.compile)
            self.codec = _SerialCodec(codec)
        except UserError as err:
            self.error = str(err)

    def _thread_job(self) -> Job:
        """This thread's job: the actor's, with a copy of the source of its own (a sharded source appends notes)."""
        job = getattr(self.local, "job", None)
        if job is None:
            job = dataclasses.replace(self.job, source=copy.deepcopy(self.job.source))
            self.local.job = job
        return job

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        k = int(batch["unit"][0])
        result: dict[str, Any] = {"unit": k, "encoded": 0, "unreadable": 0, "notes": [], "error": self.error,
                                  "actor": self.name, "idle_s": 0.0}
        if not self.error:
            seen = len(self.codec.notes)
            try:
                result.update(encode_unit(self._thread_job(), self.codec, k))
            except UserError as err:
                result["error"] = str(err)
            result["notes"] = [*result["notes"], *self.codec.notes[seen:]]
            result["idle_s"] = self.codec.idle_s
        result["notes"] = json.dumps(result["notes"])
        return {key: [value] for key, value in result.items()}
