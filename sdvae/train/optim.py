"""Optimizers and learning-rate schedules for training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class StepResult:
    """What :func:`optimizer_steps` did: the VAE's pre-clipping gradient norm (after unscaling; inf/NaN
    on a bad step) and whether the optimizer steps were skipped for a non-finite loss or gradient."""

    grad_norm: float
    skipped: bool


def _grad_norm(params: Iterable[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def optimizer_steps(
    scaler: torch.amp.GradScaler | None,
    opt: torch.optim.Optimizer,
    clip_params: Iterable[torch.Tensor],
    grad_clip: float,
    disc_opt: torch.optim.Optimizer | None = None,
    *,
    loss_finite: bool = True,
    agree: Callable[[bool], bool] = lambda ok: ok,
) -> StepResult:
    """One iteration's optimizer updates under (optional) fp16 loss scaling, skipped when not finite.

    Both losses were backpropagated scaled by the same ``scaler`` (accelerate's, fp16 only; None for
    fp32/bf16). PyTorch's multi-optimizer AMP recipe, with exactly one ``unscale_``/``step`` per
    optimizer and one ``update()`` per iteration: the gradients are unscaled, the VAE's clipped (only
    ``clip_params``, the VAE side: the discriminator's gradients are never clipped nor unscaled
    twice). accelerate's prepared optimizers are not used for this: each of them runs ``update()``
    after its own step, and ``accelerator.clip_grad_norm_`` unscales every prepared optimizer, which
    made the discriminator's gradients divided by the scale twice.

    Non-finite steps: when ``loss_finite`` is False or either optimizer's gradients hold inf/NaN,
    neither optimizer steps (the weights and Adam moments stay as they were; the caller zeroes the
    gradients as usual). ``agree`` turns this process's "all finite" flag into the verdict of every
    process (e.g. an all-reduce), so all ranks skip together. Under fp16 the scaler still runs its
    ``update()`` (an overflow lowers the scale, as without this check).

    Args:
        scaler: the loss scaler the losses were scaled with, or None.
        opt: the VAE's (+ logvar's) optimizer.
        clip_params: parameters whose gradient norm is clipped to ``grad_clip`` (0: no clipping).
        disc_opt: the discriminator's optimizer, when it steps this iteration.
        loss_finite: whether every loss of the iteration was finite on this process.
        agree: this process's flag -> the flag of all processes (identity for one process).
    """
    clip_params = list(clip_params)
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        scaler.unscale_(opt)
        if disc_opt is not None:
            scaler.unscale_(disc_opt)
    norm = _grad_norm(clip_params)
    finite = loss_finite and math.isfinite(norm)
    if disc_opt is not None:
        finite = finite and math.isfinite(_grad_norm(p for g in disc_opt.param_groups for p in g["params"]))
    skipped = not agree(finite)
    if not skipped:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
        for o in (opt, disc_opt):
            if o is not None:
                (scaler.step(o) if scaled else o.step())
    if scaled:
        scaler.update()
    return StepResult(norm, skipped)


def snapshot_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of ``module``'s buffers (e.g. BatchNorm running statistics), for :func:`restore_buffers`."""
    return [b.detach().clone() for b in module.buffers()]


def restore_buffers(module: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back the buffers :func:`snapshot_buffers` copied (undo a skipped step's BatchNorm updates)."""
    with torch.no_grad():
        for b, s in zip(module.buffers(), saved, strict=True):
            b.copy_(s)
