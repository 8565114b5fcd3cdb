"""Training checkpoints: complete-or-absent folders of safetensors + JSON (no pickle anywhere).

A checkpoint ``OUT/checkpoints/step-00000020/`` holds every module's weights, every optimizer's
state (tensors in safetensors, hyper-parameters in JSON), schedulers, the EMA, and each process's RNG
states, i.e. everything needed for a bit-exact resume. It is written under a temporary name and
renamed when complete, so a kill at any moment leaves either the whole checkpoint or none; only the
newest ``keep`` are kept (``keep=0``: all).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdvae.errors import WriteError

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step ``step``."""
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    root = Path(out) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if _NAME.match(p.name) and (p / "state.json").is_file())
    return found[-1] if found else None


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))


def save_checkpoint(
    out: str | Path,
    step: int,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any],
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically. Call on every process (each saves its own RNG state).

    Args:
        out: run folder.
        step: optimizer steps completed.
        modules: name -> unwrapped module (weights saved as ``NAME.safetensors``).
        optimizers: name -> optimizer. schedulers: name -> LR scheduler.
        extra_tensors: name -> tensor dict (e.g. the EMA's state_dict).
        meta: JSON-able run state (e.g. skipped-image count).
        rank, is_main, barrier: process info and a synchronisation callable (accelerate's
            ``wait_for_everyone``) so the folder is renamed only when every rank has written.
        keep: how many checkpoints to keep (older ones are deleted after the new one is complete);
            0 keeps all (``train.keep_checkpoints: 0``).
    """
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        _write_checkpoint(final, tmp, step, modules, optimizers, schedulers, extra_tensors, meta, rank, is_main,
                          barrier, keep)
    except OSError as err:  # disk full, read-only...: no partial step-N.tmp; older checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WriteError):
            raise
        raise WriteError(final, err) from err
    barrier()
    return final


def _write_checkpoint(final: Path, tmp: Path, step: int, modules: Mapping[str, torch.nn.Module],
                      optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                      extra_tensors: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any],
                      rank: int, is_main: bool, barrier: Callable[[], None], keep: int) -> None:
    """:func:`save_checkpoint`'s writes: every rank's RNG state, then (main) the rest, then the rename."""
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / f"rng-{rank}.safetensors")
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
    barrier()
    if is_main:
        state: dict[str, Any] = {"step": step, "meta": dict(meta), "optimizers": {}, "schedulers": {}}
        for name, module in modules.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      tmp / f"{name}.safetensors")
        for name, opt in optimizers.items():
            tensors, opt_meta = _flatten_optimizer(opt.state_dict())
            save_file(tensors, tmp / f"optimizer-{name}.safetensors")
            state["optimizers"][name] = opt_meta
        for name, sched in schedulers.items():
            state["schedulers"][name] = sched.state_dict()
        for name, tensors in extra_tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        # state.json last: its presence marks a complete folder even before the rename.
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.is_dir():  # the same step again: the old folder goes back if the new one cannot take its place
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if keep > 0:
            for old in sorted(p for p in final.parent.glob("step-*") if _NAME.match(p.name))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    rank: int = 0,
) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    Returns:
        (step, {name: tensors} for every other safetensors file (e.g. the EMA), meta).
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        tensors = load_file(path / f"optimizer-{name}.safetensors")
        opt.load_state_dict(_unflatten_optimizer(tensors, state["optimizers"][name]))
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():  # resumed with more processes than saved: fall back to rank 0's stream
        rng_file = path / "rng-0.safetensors"
    set_rng_state(load_file(rng_file), json.loads(rng_file.with_suffix(".json").read_text()))
    known = {*modules, *(f"optimizer-{n}" for n in optimizers)}
    extra = {p.stem: load_file(p) for p in path.glob("*.safetensors")
             if p.stem not in known and not p.stem.startswith("rng-")}
    return int(state["step"]), extra, state["meta"]
