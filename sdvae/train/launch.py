"""What the launcher decides: the Accelerator, resolved precision/accumulation/processes, trackers.

``accelerate launch --mixed_precision bf16`` (or ``accelerate config``, or ``ACCELERATE_MIXED_PRECISION``)
is the truth for every key the YAML leaves unset (null): ``train.mixed_precision``, ``train.grad_accum``
(``--gradient_accumulation_steps`` / ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``) and ``train.num_processes``.
A key the YAML sets wins (for processes: a different launch is refused). :func:`resolve_config` writes
the resolved values into the config saved with the run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, ProjectConfiguration

from sdvae.device import cuda_available
from sdvae.errors import UserError
from sdvae.train.config import RunConfig, config_to_dict

TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": "all", "none": None}


def grad_accum_steps(cfg: RunConfig) -> int:
    """``train.grad_accum``, else accelerate's ``--gradient_accumulation_steps`` (its environment variable), else 1."""
    if cfg.train.grad_accum is not None:
        steps = cfg.train.grad_accum
    else:
        steps = int(os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1"))
    if steps < 1:
        raise UserError(f"train.grad_accum: must be >= 1, got {steps}")
    return steps


def set_tf32(allow: bool) -> None:
    """``train.allow_tf32``: let CUDA fp32 matmuls and convolutions use TF32 tensor cores (or forbid it)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's Accelerator: precision from the YAML if set (else accelerate's), trackers per ``log.with``.

    Accumulation is done by the training loop itself (``grad_accum_steps``), so accelerate is told 1
    step: its ``backward`` would otherwise divide the loss a second time.
    """
    set_tf32(cfg.train.allow_tf32)
    if cfg.log.with_ == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("log.with=wandb: wandb is not installed (pip install wandb), or use log.with=tensorboard")
    return Accelerator(
        # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is on CPU.
        cpu=not cuda_available(),
        mixed_precision=cfg.train.mixed_precision,  # None: accelerate launch flag / config file / env
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        log_with=TRACKERS[cfg.log.with_],
        project_config=ProjectConfiguration(project_dir=cfg.train.out, logging_dir=cfg.train.out),
        # Frozen encoder (decoder-only fine-tuning) leaves parameters without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not cfg.model.train_encoder)],
    )


def resolve_config(cfg: RunConfig, accelerator: Accelerator) -> RunConfig:
    """``cfg`` with the launcher-decided keys filled in (what runs, and what config.yaml records).

    Raises:
        UserError: ``train.num_processes`` is set and the launch started another number of processes.
    """
    procs = accelerator.num_processes
    if cfg.train.keep_checkpoints < 0:
        raise UserError(f"train.keep_checkpoints: must be >= 0 (0 keeps all), got {cfg.train.keep_checkpoints}")
    if cfg.train.num_processes is not None and cfg.train.num_processes != procs:
        raise UserError(f"train.num_processes={cfg.train.num_processes} but the launcher started {procs} "
                        "process(es); launch that many or set train.num_processes to null")
    train = dataclasses.replace(cfg.train, mixed_precision=str(accelerator.mixed_precision),
                                grad_accum=grad_accum_steps(cfg), num_processes=procs)
    return dataclasses.replace(cfg, train=train)


def tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The config flattened to ``section.key`` scalars (TensorBoard's hparams take no lists or None)."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def start_trackers(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Start the ``log.with`` trackers (TensorBoard: ``OUT/tensorboard``), with the resolved config."""
    if cfg.log.with_ == "none":
        return
    name = "tensorboard" if cfg.log.with_ == "tensorboard" else Path(cfg.train.out).name
    kwargs = {} if cfg.log.with_ == "tensorboard" else {"wandb": {"dir": cfg.train.out, "name": name}}
    accelerator.init_trackers(cfg.log.project if cfg.log.with_ != "tensorboard" else name,
                              config=tracker_config(cfg), init_kwargs=kwargs)


def log_image(accelerator: Accelerator, tag: str, image: torch.Tensor, step: int) -> None:
    """Send a (C,H,W) [0,1] image (C 3, or 4 for RGBA) to every started tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, step)
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image.permute(1, 2, 0).mul(255).byte().cpu().numpy()]}, step=step)
