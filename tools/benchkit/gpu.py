"""``bench.py gpu``'s training checks: our step in bf16 and fp16 with every AMP invariant checked.

Our step (:func:`benchkit.steps.ours`, the pieces of ``tools/train.py``) trains with L1 + LPIPS + KL +
PatchGAN from ``disc_start``; checked on every iteration: finite losses, exactly one ``scaler.update()``,
both AdamW optimizers stepping (except a step an fp16 overflow skipped), the discriminator's gradients
unscaled exactly once; at the end: fp32 master weights and optimizer states, the step counts.
"""

from __future__ import annotations

import math

import torch

from .flops import count_flops
from .inputs import posterior_noise
from .memory import peak_bytes, reset_peak
from .steps import Recipe, TrainSpec, ours
from .timing import Stopwatch


def gpu_spec(tiny: bool, device: str, precision: str) -> TrainSpec:
    """The training setup every ``gpu`` row shares: ``sd`` at 256², batch 8 (``tiny``: ``test`` at 64², batch 2)."""
    return TrainSpec(preset="test" if tiny else "sd", batch=2 if tiny else 8, resolution=64 if tiny else 256,
                     precision=precision, recon="l1", lpips=1.0, lpips_net="squeeze" if tiny else "vgg",
                     kl_weight=1e-6, lr=1e-5, disc_weight=0.5, disc_start=1 if tiny else 10,
                     disc_layers=2 if tiny else 3, disc_ndf=8 if tiny else 64, device=device)


def adam_steps(opt: torch.optim.Optimizer | None) -> int:
    """How many steps (Adam)W has taken (0 before the first)."""
    if opt is None:
        return 0
    return max((int(s["step"]) for s in opt.state.values() if "step" in s), default=0)


class _Probe:
    """What one iteration's checks compare: the state before the optimizer steps, and after them."""

    def __init__(self, recipe: Recipe, disc_on: bool, updates: list[int]) -> None:
        self.recipe, self.disc_on, self.updates = recipe, disc_on, updates
        scaler = recipe.scaler
        self.scale = scaler.get_scale() if scaler else 1.0
        self.counts = (adam_steps(recipe.opt), adam_steps(recipe.disc_opt))
        self.n_updates = len(updates)
        self.scaled = ([p.grad.detach().clone() for p in recipe.discriminator.parameters()]
                       if disc_on and scaler else None)
        self.unscaled_once = True

    def after_step(self, _i: int) -> None:
        """Before zero_grad: scaler.step unscaled the discriminator's grads in place — exactly once?"""
        if self.scaled is None or not all(bool(torch.isfinite(g).all()) for g in self.scaled):
            return
        for p, s in zip(self.recipe.discriminator.parameters(), self.scaled, strict=True):
            if not torch.allclose(p.grad, s / self.scale, rtol=1e-3, atol=1e-12):
                self.unscaled_once = False
                return

    def failures(self, step: int, logs: dict) -> tuple[list[str], bool]:
        """(this iteration's failures, whether an fp16 overflow skipped the step)."""
        recipe, out = self.recipe, []
        if recipe.scaler is not None and len(self.updates) - self.n_updates != 1:
            out.append(f"step {step}: {len(self.updates) - self.n_updates} scaler updates")
        backed_off = recipe.scaler is not None and recipe.scaler.get_scale() < self.scale
        if adam_steps(recipe.opt) != self.counts[0] + 1 and not backed_off:
            out.append(f"step {step}: the VAE's optimizer did not step")
        if self.disc_on and adam_steps(recipe.disc_opt) != self.counts[1] + 1 and not backed_off:
            out.append(f"step {step}: the discriminator's optimizer did not step")
        if not self.unscaled_once:
            out.append(f"step {step}: discriminator gradients not unscaled exactly once")
        if not all(math.isfinite(v) for v in logs.values()):
            out.append(f"step {step}: non-finite loss {logs}")
        return out, backed_off


def _final_failures(recipe: Recipe, vae, spec: TrainSpec, steps: int, skipped: int) -> list[str]:
    """fp32 master weights and optimizer states; the optimizers' step counts."""
    opts = [recipe.opt, recipe.disc_opt]
    states = {t.dtype for o in opts for s in o.state.values() for t in s.values()
              if torch.is_tensor(t) and t.is_floating_point()}
    params = {p.dtype for p in [*vae.parameters(), *recipe.discriminator.parameters()]}
    out = []
    if params != {torch.float32} or states - {torch.float32}:
        out.append(f"master weights/states not fp32: {params} {states}")
    vae_steps, disc_steps = adam_steps(recipe.opt), adam_steps(recipe.disc_opt)
    if vae_steps < steps - skipped or disc_steps < steps - spec.disc_start - skipped:
        out.append(f"optimizer step counts: vae {vae_steps}, disc {disc_steps}, {skipped} skipped")
    return out


def ours_check(spec: TrainSpec, steps: int, images: torch.Tensor) -> dict:
    """Our step for ``steps`` iterations on ``images`` in ``spec.precision``: the checks and its speed
    (iterations from the 4th on, the checks between the timed parts not counted)."""
    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor

    torch.manual_seed(0)
    vae = build_preset(spec.preset)
    recipe = ours(vae, spec, steps)
    updates: list[int] = []
    if recipe.scaler is not None:  # count the scaler's updates: exactly one per iteration
        original = recipe.scaler.update
        recipe.scaler.update = lambda *a, **k: (updates.append(1), original(*a, **k))[1]
    latent = spec.resolution // downsample_factor(vae)
    noise = posterior_noise(steps + 1, images.shape[0], (vae.config.latent_channels, latent, latent))
    images = images.to(recipe.device)
    watch, failures, skipped, timed_from = Stopwatch(recipe.device), [], 0, min(3, steps - 1)
    reset_peak(recipe.device)
    for step in range(steps):
        eps = noise[step].to(recipe.device)
        with watch.lap(counted=step >= timed_from):
            logs = recipe.forward_backward(step, images, eps)
        probe = _Probe(recipe, recipe.extra["loss_fn"].disc_active(step), updates)
        recipe.on_stepped = probe.after_step
        with watch.lap(counted=step >= timed_from):
            recipe.update(step)
        bad, backed_off = probe.failures(step, logs)
        failures += bad
        skipped += backed_off
    failures += _final_failures(recipe, vae, spec, steps, skipped)
    row = {"what": f"train ours {spec.precision} (+disc, LPIPS with gradient)", "kind": "train",
           "precision": spec.precision, "images_per_s": images.shape[0] * (steps - timed_from) / watch.total,
           "seconds": watch.total / (steps - timed_from), "peak_memory": peak_bytes(recipe.device),
           "loss": logs["loss"], "disc_loss": logs.get("disc_loss"), "scaler_updates": len(updates),
           "skipped_steps": skipped, "vae_steps": adam_steps(recipe.opt), "disc_steps": adam_steps(recipe.disc_opt),
           "final_scale": recipe.scaler.get_scale() if recipe.scaler else None,
           "ok": not failures, "failures": failures[:5]}
    recipe.on_stepped = None  # one more step, counted, after every figure above was taken
    row["flops"] = count_flops(lambda: recipe.step(steps, images, noise[steps].to(recipe.device)))[1]
    return row
