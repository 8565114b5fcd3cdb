"""Deterministic crashes and NaN batches for subprocess tests, from the test side only.

    python tests/crash_hook.py tools/train.py CONFIG.yaml [--section.key=value ...]
    python tests/crash_hook.py -m sdvae.cli encode-dataset ...
    python tests/crash_hook.py --serve      # fork server, see :class:`Launcher`

Runs the script (or module) exactly as ``python SCRIPT ARGS`` would, after wrapping a few library
functions. Library code carries no test code: every hook is a monkeypatch installed here, before the
script imports the names it uses.

``SDVAE_TEST_KILL=MOMENT:N`` kills the whole process group (the process and its DataLoader workers,
like ``kill -9 -PGID`` or a power cut; start the process with ``start_new_session=True``) at the N-th
(1-based) occurrence of MOMENT in this process:

* ``accum``: after a micro-batch's backward, before the next micro-batch of the same optimizer step
  (leaving ``accelerator.no_sync``; gradients are half accumulated);
* ``step``: right before ``optimizer_steps`` (all micro-batches accumulated, no optimizer step yet);
* ``ckpt``: right before a ``save_file`` of ``sdvae.train.checkpoint`` (between a checkpoint's tensor files);
* ``val``: inside validation, after the metrics are computed and before the sample grid is written;
* ``export``: right after ``final/`` is written (before ``metrics.json``);
* ``shard``: encode-dataset, right before a shard's rows file (or ``skipped.txt``) is written, locally or to
  an object store (its JSON side files are out);
* ``json``: encode-dataset, right before a JSON file is written: the arguments, a shard's skip report or
  info (row count, preview-fit sums), or a dataset file at completion;
* ``batch``: encode-dataset, after an encoded batch (``ENCODE_BATCH_DELAY_S``'s hook point).

``SDVAE_TEST_NAN=P1,P2,...`` makes the posterior noise NaN for the micro-batches at those 0-based
positions (``step * grad_accum + micro``), so those optimizer steps get non-finite losses and gradients.

``SDVAE_TEST_GLOBAL_RNG=1`` adds to every micro-batch's posterior noise (in the training process, where
checkpoints save and restore RNG states) a small shift drawn from the global torch, numpy and Python
generators, standing in for a user's augmentation or a library's dropout. Training itself draws nothing
from them, so without this a resume that failed to restore one of them would still be bit-exact.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_counts: Counter[str] = Counter()


KILL: tuple[str, int] | None = None


def _read_kill_spec() -> None:
    global KILL
    spec = os.environ.get("SDVAE_TEST_KILL", "")
    moment, _, n = spec.partition(":")
    KILL = (moment, int(n or 1)) if spec else None
    _counts.clear()


def tick(moment: str) -> None:
    """Count one occurrence of ``moment``; kill the process group at the configured one."""
    if KILL is None or KILL[0] != moment:
        return
    _counts[moment] += 1
    if _counts[moment] == KILL[1]:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            if os.getpgid(0) == os.getpid():  # our own session: take the DataLoader workers with us
                os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(module: Any, name: str, before: str | None = None, after: str | None = None) -> None:
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            tick(before)
        result = original(*args, **kwargs)
        if after:
            tick(after)
        return result

    setattr(module, name, wrapper)


def _draw_from_global_rngs(vae_forward: Any) -> None:
    """Wrap ``posterior_noise`` (called once per micro-batch, in the training process) so that its noise
    moves by 0.01 x (a torch.rand per element + one numpy and one Python uniform draw, centred): each
    global stream then reaches the weights, and a wrong stream after a resume changes them."""
    import random

    import numpy as np
    import torch

    original_noise = vae_forward.posterior_noise

    def posterior_noise(*args: Any, **kwargs: Any) -> torch.Tensor:
        eps = original_noise(*args, **kwargs)
        shift = torch.rand(eps.shape) + float(np.random.random()) + random.random() - 1.5
        return eps + 0.01 * shift

    vae_forward.posterior_noise = posterior_noise


def install_train_hooks() -> None:
    _read_kill_spec()
    import accelerate
    import torch

    import sdvae.model.save
    import sdvae.train.checkpoint
    import sdvae.train.optim
    import sdvae.train.vae_forward
    import sdvae.train.validation

    original_no_sync = accelerate.Accelerator.no_sync

    @contextlib.contextmanager
    def no_sync(self: Any, model: Any = None) -> Any:
        with original_no_sync(self, model):
            yield
        tick("accum")

    accelerate.Accelerator.no_sync = no_sync
    _wrap(sdvae.train.optim, "optimizer_steps", before="step")
    _wrap(sdvae.train.checkpoint, "save_file", before="ckpt")
    _wrap(sdvae.train.validation, "reconstruction_metrics", after="val")
    _wrap(sdvae.model.save, "save_diffusers", after="export")

    if os.environ.get("SDVAE_TEST_GLOBAL_RNG") == "1":
        _draw_from_global_rngs(sdvae.train.vae_forward)

    nan = {int(p) for p in os.environ.get("SDVAE_TEST_NAN", "").split(",") if p.strip()}
    if nan:
        original_noise = sdvae.train.vae_forward.posterior_noise

        def posterior_noise(index: Any, position: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            eps = original_noise(index, position, *args, **kwargs)
            return torch.full_like(eps, float("nan")) if position in nan else eps

        sdvae.train.vae_forward.posterior_noise = posterior_noise


def install_encode_hooks() -> None:
    _read_kill_spec()
    import sdvae.latents.encode_job
    import sdvae.storage.files

    # Every write of the run goes through sdvae.storage.files: rows files (and skipped.txt) as bytes, the
    # arguments, side files and dataset metadata as JSON.
    _wrap(sdvae.storage.files, "write_bytes", before="shard")
    _wrap(sdvae.storage.files, "write_json", before="json")
    _wrap(sdvae.latents.encode_job, "encode_batch", after="batch")


def main(argv: list[str]) -> None:
    """Install the hooks and run ``argv`` (``SCRIPT ARGS`` or ``-m MODULE ARGS``) as ``__main__``."""
    if argv[0] == "-m":
        install_encode_hooks()
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    install_train_hooks()
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="__main__")


# --- fork server ----------------------------------------------------------------------------------
# Importing torch/diffusers/accelerate takes seconds; a crash test starts a dozen runs. The server
# imports them once and forks one child per run (a fresh session: its kill takes its DataLoader
# workers, never the server). Nothing in the server touches torch's RNG, threads or devices.


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    import random

    import numpy as np

    os.setsid()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    random.seed()  # a fresh interpreter's unseeded streams, not copies of the server's
    np.random.seed()
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """Read ``{"argv", "env", "log"}`` JSON lines on stdin; run each in a forked child; answer its exit
    status (negative: killed by that signal) as a JSON line."""
    import importlib
    import importlib.util
    import json

    for name in ("torch", "accelerate", "diffusers", "sdvae.train.launch", "sdvae.cli.main",
                 "sdvae.latents.export"):
        importlib.import_module(name)
    spec = importlib.util.spec_from_file_location("_train_preload", Path(__file__).parents[1] / "tools" / "train.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the script's imports, not its main
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["argv"], request.get("env", {}), request["log"])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)


class Launcher:
    """Client of :func:`serve`: ``run(argv, env, log) -> exit code`` (−9 when killed), seconds faster
    than a fresh interpreter per run. Use as a context manager."""

    def __init__(self, env: dict[str, str], cwd: str | Path) -> None:
        import json
        import subprocess

        self._json = json
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError("crash_hook server failed to start")

    def run(self, argv: list[str], log: str | Path, env: dict[str, str] | None = None) -> int:
        request = {"argv": [str(a) for a in argv], "env": env or {}, "log": str(log)}
        self.proc.stdin.write(self._json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("crash_hook server died")
        return int(self._json.loads(answer)["rc"])

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(sys.argv[1:])
