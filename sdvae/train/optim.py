"""Optimizers and learning-rate schedules for training."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from sdvae.train.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warmup over ``cfg.warmup_steps``, then constant or cosine decay to ``cfg.min_lr_ratio``
    at ``total_steps``.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, cfg: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` with the configured betas/weight decay, and its LambdaLR schedule."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched


def effective_lr(lr: float, cfg: OptimConfig, batch_size: int, num_processes: int, grad_accum: int) -> float:
    """The learning rate the optimizer gets: ``lr``, or with ``cfg.scale_lr`` LDM's
    ``lr × batch_size × num_processes × grad_accum`` (LDM's ``base_learning_rate`` is per image)."""
    return lr * batch_size * num_processes * grad_accum if cfg.scale_lr else lr


def optimizer_steps(
    scaler: torch.amp.GradScaler | None,
    opt: torch.optim.Optimizer,
    clip_params: Iterable[torch.Tensor],
    grad_clip: float,
    disc_opt: torch.optim.Optimizer | None = None,
) -> float | None:
    """One iteration's optimizer updates under (optional) fp16 loss scaling; returns the VAE's grad norm.

    Both losses were backpropagated scaled by the same ``scaler`` (accelerate's, fp16 only; None for
    fp32/bf16). PyTorch's multi-optimizer AMP recipe, with exactly one ``unscale_``/``step`` per
    optimizer and one ``update()`` per iteration: the VAE's gradients are unscaled and clipped (only
    ``clip_params``, the VAE side: the discriminator's gradients are never clipped nor unscaled
    twice), ``scaler.step`` unscales the discriminator's itself, and a step whose gradients hold
    inf/NaN is skipped per optimizer. accelerate's prepared optimizers are not used for this: each of
    them runs ``update()`` after its own step, and ``accelerator.clip_grad_norm_`` unscales every
    prepared optimizer, which made the discriminator's gradients divided by the scale twice.

    Args:
        scaler: the loss scaler the losses were scaled with, or None.
        opt: the VAE's (+ logvar's) optimizer.
        clip_params: parameters whose gradient norm is clipped to ``grad_clip`` (> 0), after unscaling.
        disc_opt: the discriminator's optimizer, when it steps this iteration.

    Returns:
        The pre-clipping gradient norm (None without clipping).
    """
    norm = None
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(opt)
        if grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(list(clip_params), grad_clip))
        scaler.step(opt)
        if disc_opt is not None:
            scaler.step(disc_opt)
        scaler.update()
        return norm
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(list(clip_params), grad_clip))
    opt.step()
    if disc_opt is not None:
        disc_opt.step()
    return norm
