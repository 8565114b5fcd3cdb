"""fp16 loss scaling with two optimizers (sdvae.train.optim.optimizer_steps), on CPU.

accelerate only creates its ``GradScaler`` on CUDA; these tests install the same kind of scaler in a CPU
Accelerator so that the exact code path of an fp16 GPU run (``accelerator.backward`` scaling both
losses, then ``optimizer_steps``) runs here.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from sdvae.model.build import build_preset
from sdvae.train.config import LossConfig
from sdvae.train.losses import VAELoss
from sdvae.train.optim import optimizer_steps
from sdvae.train.vae_forward import VAEForward

CFG = LossConfig(recon="l1", kl_weight=1e-6, disc_weight=0.5, disc_start=0, disc_layers=2)


def _one_iteration(scaler: torch.amp.GradScaler | None, grad_clip: float):
    """One training iteration (generator + discriminator backward, both optimizers step).

    SGD (update = −lr·grad) instead of AdamW: Adam's first update is ±lr whatever the gradient's
    scale, which would hide a gradient divided by the loss scale twice.
    """
    torch.manual_seed(0)
    vae = build_preset("test").train()
    loss_fn = VAELoss(CFG, disc_ndf=8)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = scaler  # what accelerate installs for mixed_precision="fp16" on CUDA
    opt = torch.optim.SGD(vae.parameters(), lr=0.1)
    disc_opt = torch.optim.SGD(loss_fn.discriminator.parameters(), lr=0.1)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    recon, mean, logvar = VAEForward(vae)(images, eps)
    g_loss, _ = loss_fn.generator_loss(images, recon, mean, logvar, 0, vae.decoder.conv_out.weight)
    accelerator.backward(g_loss)
    d_loss, _ = loss_fn.discriminator_loss(images, recon, 0)
    accelerator.backward(d_loss)
    before_vae = [p.detach().clone() for p in vae.parameters()]
    before_disc = [p.detach().clone() for p in loss_fn.discriminator.parameters()]
    updates = []
    if scaler is not None:
        original = scaler.update
        scaler.update = lambda *a, **k: (updates.append(1), original(*a, **k))[1]
    result = optimizer_steps(accelerator.scaler, opt, list(vae.parameters()), grad_clip, disc_opt)
    assert not result.skipped
    norm = result.grad_norm
    d_vae = torch.cat([(p.detach() - b).flatten() for p, b in zip(vae.parameters(), before_vae, strict=True)])
    d_disc = torch.cat([(p.detach() - b).flatten()
                        for p, b in zip(loss_fn.discriminator.parameters(), before_disc, strict=True)])
    return d_vae, d_disc, len(updates), norm


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=2e-3, atol=1e-6 * float(b.abs().max())))


def test_fp16_scaler_gives_the_fp32_updates_of_both_optimizers_and_one_update_per_iteration():
    ref_vae, ref_disc, _, ref_norm = _one_iteration(None, grad_clip=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    vae, disc, updates, norm = _one_iteration(scaler, grad_clip=0.01)
    assert float(ref_disc.abs().max()) > 0 and float(ref_vae.abs().max()) > 0
    assert _close(disc, ref_disc), "discriminator gradients unscaled twice (or not at all)"
    assert _close(vae, ref_vae), "VAE update differs from fp32 (unscale before clipping?)"
    assert norm is not None and abs(norm - ref_norm) <= 1e-3 * ref_norm  # clipped on unscaled gradients
    assert updates == 1
    assert scaler.get_scale() == 2.0**16  # finite gradients: the scale was kept



def test_scaler_state_round_trips_through_checkpoint_json():
    """tools/train.py keeps the fp16 scaler's state in state.json (meta.scaler): JSON-able and exact."""
    import json

    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for loss in (layer.weight.sum() * float("inf"), layer.weight.sum(), layer.weight.sum()):
        scaler.scale(loss).backward()
        optimizer_steps(scaler, opt, layer.parameters(), 0.0)
        opt.zero_grad()
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert restored.get_scale() == scaler.get_scale() == 2.0**9
    assert restored._get_growth_tracker() == scaler._get_growth_tracker() == 2
