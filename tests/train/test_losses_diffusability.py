"""The diffusability regularisers of the training loss (issue 36, part 3): ``loss.equivariance`` (EQ-VAE)
and ``loss.scale_equivariance``.

Each term's value against an independent computation, its gradient reaching encoder and decoder, the
weight-0 default leaving a training step bit for bit as it is without the regulariser code path, and the
τ draws as a pure function of (seed, micro-batch count). Fast and CPU-only: the micro `test` VAE (f = 8)
on 32×32 images, so latents are 4×4 (every τ lands on whole cells).
"""

from __future__ import annotations

import typing
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import seeded_train_vae, uniform_images
from sdvae.errors import UserError
from sdvae.eval.diffusability import TRANSFORMS
from sdvae.metrics.lpips import build_lpips, lpips_distance
from sdvae.train.config import EquivarianceTransform, LossConfig, load_config
from sdvae.train.losses import VAELoss
from sdvae.train.modules import decoder_last_layer
from sdvae.train.regularisers import draw_transform
from sdvae.train.vae_forward import VAEForward, latent_decoder, posterior_noise, reparameterize

# Only the reconstruction term on (KL, LPIPS, GAN off); each test switches on what it examines.
BASE = LossConfig(recon_weight=1.0, lpips_weight=0.0, kl_weight=0.0, disc_weight=0.0)
LATENT_SHAPE = (4, 4, 4)  # `test` preset: 4 latent channels, factor 8, 32x32 images


def _forward(model: VAEForward, images: torch.Tensor, position: int = 0):
    """tools/train.py's forward: seeded posterior noise, recon/mean/logvar, and the sampled z."""
    eps = posterior_noise(torch.arange(len(images)), position, LATENT_SHAPE, seed=0)
    recon, mean, logvar = model(images, eps)
    return recon, mean, logvar, reparameterize(mean, logvar, eps)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


@pytest.fixture(scope="module")
def lpips_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_lpips("squeeze", random_backbone=True)


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------


def test_config_transforms_are_the_eval_transforms_and_bad_values_are_user_errors():
    assert typing.get_args(EquivarianceTransform) == TRANSFORMS  # the names `eval --diffusability` reports
    cfg = LossConfig()
    assert cfg.equivariance == 0.0 and cfg.scale_equivariance == 0.0  # off by default
    assert set(cfg.equivariance_transforms) == set(TRANSFORMS)
    assert load_config(None, ["--loss.equivariance_transforms=[rotate_90, rotate_90, scale_0.5]"]).loss \
        .equivariance_transforms == ("rotate_90", "rotate_90", "scale_0.5")
    with pytest.raises(UserError, match=r"loss.equivariance_transforms\[0\]: 'rot90' is not one of"):
        load_config(None, ["--loss.equivariance_transforms=[rot90]"])
    with pytest.raises(UserError, match=r"loss\.equivariance_transforms: 'hflip' is not one of"):
        LossConfig(equivariance_transforms=("hflip",))  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"loss\.scale_equivariance: must be >= 0"):
        LossConfig(scale_equivariance=-1.0)
    with pytest.raises(UserError, match=r"loss\.equivariance_transforms: empty"):
        LossConfig(equivariance=0.5, equivariance_transforms=())
    with pytest.raises(UserError, match=r"recon_weight and loss\.lpips_weight are both 0"):
        LossConfig(recon_weight=0.0, scale_equivariance=1.0)


def test_latent_sides_that_a_scale_cannot_resample_are_a_user_error():
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images(size=48)  # latents 6x6: scale_0.75 needs multiples of 4
    eps = torch.zeros(2, 4, 6, 6)
    recon, mean, logvar = model(images, eps)
    loss_fn = VAELoss(replace(BASE, equivariance=1.0))
    with pytest.raises(UserError, match=r"loss\.equivariance_transforms: scale_0.75 needs latent sides that are "
                                        "multiples of 4, got 6x6"):
        loss_fn.generator_loss(images, recon, mean, logvar, 0, latents=reparameterize(mean, logvar, eps),
                               decode=latent_decoder(model), tau="scale_0.75")


# ---------------------------------------------------------------------------------------------------
# value and gradient of each term
# ---------------------------------------------------------------------------------------------------

# (config change, tau, independent τ): the scale regulariser's ×½ is checked against avg_pool2d, the
# EQ-VAE transforms against torch's own flip/rot90 and bilinear-free box averages of 4→3 cells.
CASES = {
    "equivariance-flip_horizontal": ({"equivariance": 0.7}, "flip_horizontal", lambda t: t.flip(-1)),
    "equivariance-rotate_90": ({"equivariance": 0.7}, "rotate_90", lambda t: torch.rot90(t, 1, (2, 3))),
    "equivariance-scale_0.5": ({"equivariance": 0.7}, "scale_0.5", lambda t: F.avg_pool2d(t, 2)),
    "equivariance-scale_0.75": ({"equivariance": 0.7}, "scale_0.75",
                                lambda t: F.interpolate(F.interpolate(t, scale_factor=3, mode="nearest"),
                                                        scale_factor=0.25, mode="area")),
    "scale_equivariance": ({"scale_equivariance": 0.7}, None, lambda t: F.avg_pool2d(t, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("recon", ["l1", "mse"])
def test_each_regulariser_is_its_formula_and_reaches_encoder_and_decoder(case, recon):
    change, tau, reference = CASES[case]
    name = "scale_equivariance" if tau is None else "equivariance"
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images()
    recon_img, mean, logvar, z = _forward(model, images)
    loss_fn = VAELoss(replace(BASE, recon=recon, recon_weight=2.0, **change))
    # The main term sees a detached reconstruction: every parameter gradient below is the regulariser's.
    loss, logs = loss_fn.generator_loss(images, recon_img.detach(), mean, logvar, 0, latents=z,
                                        decode=latent_decoder(model), tau=tau)
    with torch.no_grad():
        diff = vae.decode(reference(z)).sample - reference(images)
        expected = 2.0 * (diff.abs().mean() if recon == "l1" else diff.square().mean())
    assert logs[name] == pytest.approx(float(expected), rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["nll"] + 0.7 * logs[name], rel=1e-6)
    assert set(logs) == {"loss", "rec", "nll", name, "kl", "kl_bpd"}
    loss.backward()
    assert _grad(vae.decoder.conv_out.weight).abs().sum() > 0
    assert _grad(vae.encoder.conv_in.weight).abs().sum() > 0
    assert _grad(vae.quant_conv.weight).abs().sum() > 0


def test_regulariser_with_lpips_uses_the_main_terms_metric(lpips_net):
    """With LPIPS in the recipe, R = recon_weight·L1 + lpips_weight·LPIPS of the transformed pair."""
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images(size=64)
    eps = torch.zeros(2, 4, 8, 8)
    recon, mean, logvar = model(images, eps)
    z = reparameterize(mean, logvar, eps)
    loss_fn = VAELoss(replace(BASE, lpips_weight=0.3, scale_equivariance=1.0), lpips_model=lpips_net)
    _, logs = loss_fn.generator_loss(images, recon, mean, logvar, 0, latents=z, decode=latent_decoder(model))
    with torch.no_grad():
        target, out = F.avg_pool2d(images, 2), vae.decode(F.avg_pool2d(z, 2)).sample
        expected = (out - target).abs().mean() + 0.3 * lpips_distance(lpips_net, target, out).mean()
    assert logs["scale_equivariance"] == pytest.approx(float(expected), rel=1e-5)


def test_both_regularisers_add_up():
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images()
    recon, mean, logvar, z = _forward(model, images)
    kwargs = {"latents": z, "decode": latent_decoder(model), "tau": "rotate_90"}
    _, both = VAELoss(replace(BASE, equivariance=0.5, scale_equivariance=2.0)).generator_loss(
        images, recon, mean, logvar, 0, **kwargs)
    _, eq = VAELoss(replace(BASE, equivariance=0.5)).generator_loss(images, recon, mean, logvar, 0, **kwargs)
    assert both["equivariance"] == eq["equivariance"]
    assert both["loss"] == pytest.approx(both["nll"] + 0.5 * both["equivariance"] + 2.0 * both["scale_equivariance"],
                                         rel=1e-6)


def test_reparameterize_is_the_latent_the_forward_decodes():
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images()
    recon, mean, logvar, z = _forward(model, images)
    assert torch.equal(latent_decoder(model)(z), recon)
    assert torch.equal(reparameterize(mean, logvar, None), mean)


# ---------------------------------------------------------------------------------------------------
# weight 0: the step of today, bit for bit
# ---------------------------------------------------------------------------------------------------


def _train(cfg: LossConfig, regulariser_path: bool, steps: int = 3) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """tools/train.py's step (forward, generator loss, backward, clipping, AdamW) for a few steps.

    ``regulariser_path``: call the loss as tools/train.py does now (τ drawn, z, decode passed);
    otherwise as it did before the regularisers existed (no τ draw, no z, no decode).
    """
    vae = seeded_train_vae()
    model = VAEForward(vae)
    loss_fn = VAELoss(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.5, 0.9))
    last_layer, decode = decoder_last_layer(vae), latent_decoder(model)
    logs = []
    for step in range(steps):
        images = uniform_images(seed=step, batch=3)
        eps = posterior_noise(torch.arange(3) + 3 * step, step, LATENT_SHAPE, seed=0)
        if regulariser_path:
            tau = draw_transform(cfg, 0, step)
            recon, mean, logvar = model(images, eps)
            loss, log = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer,
                                               latents=reparameterize(mean, logvar, eps), decode=decode, tau=tau)
        else:
            recon, mean, logvar = model(images, eps)
            loss, log = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append(log)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}, logs


def test_weight_zero_step_is_bit_identical_to_the_step_without_regularisers():
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    before, before_logs = _train(LossConfig(), regulariser_path=False)  # defaults, the call of old
    assert torch.equal(torch.get_rng_state(), rng)
    explicit = LossConfig(equivariance=0.0, scale_equivariance=0.0)
    after, after_logs = _train(explicit, regulariser_path=True)
    assert torch.equal(torch.get_rng_state(), rng)  # no global RNG draw on the regulariser path either
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after_logs == before_logs  # the same floats under the same names: no new terms
    assert set(after_logs[0]) == {"loss", "rec", "nll", "kl", "kl_bpd"}
    # The regulariser does change the trajectory when it is on (the comparison above can fail).
    changed, changed_logs = _train(replace(explicit, equivariance=0.5), regulariser_path=True)
    assert not all(torch.equal(before[k], changed[k]) for k in before)
    assert "equivariance" in changed_logs[0]


# ---------------------------------------------------------------------------------------------------
# τ draws
# ---------------------------------------------------------------------------------------------------


def test_tau_draws_are_a_pure_function_of_seed_and_position():
    cfg = LossConfig(equivariance=0.1)
    rng = torch.get_rng_state()
    straight = [draw_transform(cfg, 7, position) for position in range(200)]
    assert torch.equal(torch.get_rng_state(), rng)  # no global RNG draw
    # A "resumed" run asks for the positions from 120 on only, after other random draws elsewhere.
    torch.rand(5)
    _ = [draw_transform(cfg, 8, position) for position in range(50)]
    resumed = [draw_transform(cfg, 7, position) for position in range(120, 200)]
    assert resumed == straight[120:]
    counts = {name: straight.count(name) for name in cfg.equivariance_transforms}
    assert all(20 <= n <= 80 for n in counts.values()), counts  # uniform over the four (50 expected each)
    assert [draw_transform(cfg, 8, p) for p in range(200)] != straight  # the seed matters
    only = replace(cfg, equivariance_transforms=("rotate_90",))
    assert {draw_transform(only, 7, p) for p in range(20)} == {"rotate_90"}
    assert draw_transform(LossConfig(), 7, 0) is None  # off: nothing drawn

