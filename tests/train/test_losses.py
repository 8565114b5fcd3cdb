"""Training losses, LPIPS and the discriminator: every term's gradient path, KL math, adaptive GAN weight,
LPIPS weight resolution without network, mixed precision, and DDP.

Fast and CPU-only: the micro `test` VAE on 32×32 images, LPIPS with random (squeezenet/alexnet)
backbones, a narrow discriminator.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from sdvae.errors import UserError
from sdvae.metrics.information import bits_per_dim
from sdvae.metrics.lpips import build_lpips, lpips_backbone_cache_path, lpips_distance
from sdvae.model.build import build_preset
from sdvae.train.config import LossConfig
from sdvae.train.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from sdvae.train.losses import VAELoss, adaptive_weight, kl_divergence
from sdvae.train.modules import decoder_last_layer

# Every term off; each test switches on what it examines.
OFF = LossConfig(recon_weight=0.0, lpips_weight=0.0, kl_weight=0.0, disc_weight=0.0, disc_start=0, disc_layers=2)
DISC = {"disc_ndf": 8}  # a narrow PatchGAN keeps the tests fast


def _images(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


def _forward(vae: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """encode → reparameterised sample (fixed noise) → decode, with gradients."""
    post = vae.encode(images).latent_dist
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    recon = vae.decode(post.mean + post.std * eps.to(post.mean.dtype)).sample
    return recon, post.mean, post.logvar


@pytest.fixture(scope="module")
def lpips_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_lpips("squeeze", random_backbone=True)


@pytest.fixture
def vae() -> nn.Module:
    return build_preset("test").train()




def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


# ---------------------------------------------------------------------------------------------------
# 1. every term reaches the parameters it must reach
# ---------------------------------------------------------------------------------------------------

TERMS = {
    "l1": {"recon": "l1", "recon_weight": 1.0},
    "mse": {"recon": "mse", "recon_weight": 1.0},
    "lpips": {"lpips_weight": 1.0},
    "nll": {"recon_weight": 1.0, "learned_logvar": True},
    "gan": {"disc_weight": 1.0, "disc_adaptive_weight": False},
}


@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_alone_gives_decoder_gradient(term, vae, lpips_net):
    loss_fn = VAELoss(replace(OFF, **TERMS[term]), lpips_model=lpips_net, **DISC)
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=0, last_layer=decoder_last_layer(vae))
    assert loss.requires_grad and math.isfinite(logs["loss"]) and logs["loss"] != 0.0
    loss.backward()
    assert _grad(vae.decoder.conv_out.weight).abs().sum() > 0
    assert _grad(vae.encoder.conv_in.weight).abs().sum() > 0  # through the reparameterised sample
    if term == "lpips":  # diffusers' reference computes LPIPS under no_grad: no path to the decoder at all
        with torch.no_grad():
            assert not lpips_distance(lpips_net, images, recon).requires_grad
    if term == "nll":
        assert loss_fn.logvar.grad is not None and loss_fn.logvar.grad.abs() > 0
    if term == "gan":  # the generator step never trains the discriminator
        assert all(p.grad is None for p in loss_fn.discriminator.parameters())
        assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # flags restored


def test_kl_term_trains_encoder_only(vae):
    loss_fn = VAELoss(replace(OFF, kl_weight=1.0))
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=0)
    loss.backward()
    assert _grad(vae.encoder.conv_in.weight).abs().sum() > 0
    assert _grad(vae.decoder.conv_out.weight).abs().sum() == 0
    # The KL enters per image element (LDM's loss / 3·H·W); the log is in nats per image.
    assert logs["loss"] == pytest.approx(logs["kl"] / images[0].numel(), rel=1e-5)
    assert logs["rec"] > 0  # disabled terms are still logged


def test_nll_formula_and_reduction(vae):
    loss_fn = VAELoss(replace(OFF, recon_weight=2.0, learned_logvar=True, kl_weight=1e-3), logvar_init=0.3)
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=0)
    rec = (recon - images).abs().mean()
    nll = 2.0 * rec / math.exp(0.3) + 0.3
    ldm_kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum() / images.shape[0]
    assert logs["logvar"] == pytest.approx(0.3)
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert loss.item() == pytest.approx(nll.item() + 1e-3 * ldm_kl.item() / images[0].numel(), rel=1e-5)
    assert loss_fn.trainable_parameters() == [loss_fn.logvar]


# ---------------------------------------------------------------------------------------------------
# 2. the discriminator step
# ---------------------------------------------------------------------------------------------------


def test_discriminator_step_leaves_vae_gradients_untouched(vae):
    loss_fn = VAELoss(replace(OFF, recon_weight=1.0, disc_weight=0.5), **DISC)
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    d_loss, _ = loss_fn.discriminator_loss(images, recon, step=0)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())  # nothing reached the VAE
    disc_grads = [p.grad for p in loss_fn.discriminator.parameters()]
    assert all(g is not None for g in disc_grads) and sum(g.abs().sum() for g in disc_grads) > 0

    # After a generator backward the VAE's gradients stay bit-identical through a discriminator step.
    g_loss, _ = loss_fn.generator_loss(images, recon, mean, logvar, step=0, last_layer=decoder_last_layer(vae))
    g_loss.backward()
    before = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    assert before
    loss_fn.discriminator_loss(images, recon, step=0)[0].backward()
    assert all(torch.equal(p.grad, before[n]) for n, p in vae.named_parameters() if n in before)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_losses(kind):
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    if kind == "hinge":
        assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    else:
        sp = nn.functional.softplus
        expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
        assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    loss_fn = VAELoss(replace(OFF, disc_weight=1.0, disc_loss=kind), **DISC)
    images = _images()
    loss, logs = loss_fn.discriminator_loss(images, images.flip(-1), step=0)
    assert math.isfinite(logs["disc_loss"]) and loss.item() == pytest.approx(logs["disc_loss"])


def test_patchgan_architecture():
    disc = NLayerDiscriminator(ndf=8, n_layers=3)
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix 70×70 PatchGAN
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    assert abs(torch.cat([c.weight.flatten() for c in convs]).std().item() - 0.02) < 0.002
    for norm in ("group", "none"):
        assert NLayerDiscriminator(ndf=8, n_layers=2, norm=norm)(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)


# ---------------------------------------------------------------------------------------------------
# 3. KL divergence
# ---------------------------------------------------------------------------------------------------


def test_kl_matches_closed_form_and_monte_carlo():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from torch.distributions import Normal

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) * 0.5
    kl = kl_divergence(mean, logvar)

    q, p = Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean))
    exact = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert kl.item() == pytest.approx(exact.item(), rel=1e-6)
    diffusers_kl = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl().mean()
    assert kl.item() == pytest.approx(diffusers_kl.item(), rel=1e-6)

    torch.manual_seed(0)
    z = q.sample((100_000,))  # E_q[log q(z) − log p(z)], summed over latent dims, averaged over images
    mc = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(2).mean()
    assert kl.item() == pytest.approx(mc.item(), rel=0.01)

    assert kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item() == 0.0
    assert bits_per_dim(kl, 3 * 24 * 24) == pytest.approx(kl.item() / (math.log(2) * 3 * 24 * 24))


# ---------------------------------------------------------------------------------------------------
# 4. adaptive GAN weight, disc_start
# ---------------------------------------------------------------------------------------------------


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    expected = a.norm() / (b.norm() + 1e-4)
    assert adaptive_weight((w * a).sum(), (w * b).sum(), w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert adaptive_weight((w * a).sum(), (w * b * 1e-12).sum(), w).item() == 1e4  # clamp
    assert adaptive_weight(torch.tensor(1.0), (w * b).sum(), w).item() == 0.0  # constant nll
    with torch.no_grad():
        assert adaptive_weight((w * a).sum(), (w * b).sum(), w).item() == 0.0  # evaluation, as LDM
    with pytest.raises(ValueError, match="last_layer"):
        adaptive_weight((w * a).sum(), (w * b).sum(), nn.Parameter(torch.zeros(1)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_generator_loss_uses_adaptive_weight(checkpointing, vae, lpips_net):
    if checkpointing:
        vae.enable_gradient_checkpointing()
    cfg = replace(OFF, recon_weight=1.0, lpips_weight=0.5, disc_weight=0.5)
    loss_fn = VAELoss(cfg, lpips_model=lpips_net, **DISC)
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    last = decoder_last_layer(vae)
    loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=0, last_layer=last)

    # By hand: the same two losses, their gradients at the decoder's last weight, LDM's ratio.
    nll = (recon - images).abs().mean() + 0.5 * lpips_distance(lpips_net, images, recon).mean()
    g_adv = -loss_fn.discriminator(recon).mean()
    (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_gan,) = torch.autograd.grad(g_adv, last, retain_graph=True)
    expected = 0.5 * (g_nll.norm() / (g_gan.norm() + 1e-4)).item()
    assert logs["d_weight"] == pytest.approx(expected, rel=1e-4)
    assert logs["g_adv"] == pytest.approx(g_adv.item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["nll"] + logs["d_weight"] * logs["g_adv"], rel=1e-5)
    assert last.grad is None  # autograd.grad read gradients without accumulating them


def test_disc_terms_are_zero_before_disc_start(vae):
    cfg = replace(OFF, recon_weight=1.0, kl_weight=1e-3, disc_weight=0.5, disc_start=10)
    loss_fn = VAELoss(cfg, **DISC)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    images = _images()
    recon, mean, logvar = _forward(vae, images)
    last = decoder_last_layer(vae)
    loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=9, last_layer=last)
    plain, _ = VAELoss(replace(cfg, disc_weight=0.0)).generator_loss(images, recon, mean, logvar, step=9)
    assert logs["g_adv"] == 0.0 and logs["d_weight"] == 0.0
    assert loss.item() == plain.item()
    d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=9)
    assert d_loss.item() == 0.0 and d_logs["disc_loss"] == 0.0
    assert not calls  # the discriminator is not even run
    (loss + d_loss).backward()  # a valid graph: zero (not missing) discriminator gradients
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in loss_fn.discriminator.parameters())
    assert not loss_fn.disc_active(9) and loss_fn.disc_active(10)
    recon, mean, logvar = _forward(vae, images)  # the first graph was freed by backward()
    _, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=10, last_layer=last)
    assert logs["g_adv"] != 0.0 and logs["d_weight"] > 0.0 and calls


# ---------------------------------------------------------------------------------------------------
# 5. LPIPS: no download, explicit weights, frozen and never saved
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("net", "filename"), [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth"),
                                               ("squeeze", "squeezenet1_1-b8a52dc0.pth")])
def test_lpips_missing_weights_is_a_one_line_error(net, filename, empty_hub):
    with pytest.raises(UserError) as err:
        build_lpips(net)
    message = str(err.value)
    assert "\n" not in message
    assert f"https://download.pytorch.org/models/{filename}" in message
    assert str(empty_hub / "checkpoints" / filename) in message and "--loss.lpips_weights" in message
    with pytest.raises(UserError, match="lpips_weights"):
        build_lpips(net, weights_path=empty_hub / "nope.pth")


def test_vaeloss_reports_missing_lpips_weights(empty_hub):
    with pytest.raises(UserError, match=r"vgg16-397923af\.pth"):
        VAELoss(LossConfig(lpips_weight=1.0))


def _squeeze_backbone(seed: int) -> dict[str, torch.Tensor]:
    from torchvision.models import squeezenet1_1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return squeezenet1_1(weights=None).state_dict()


def test_lpips_local_weights_are_loaded_and_used(tmp_path, empty_hub, lpips_net):
    from safetensors.torch import save_file

    state = _squeeze_backbone(seed=7)
    torch.save(state, tmp_path / "squeeze.pth")
    save_file(state, str(tmp_path / "squeeze.safetensors"))
    images = _images()
    other = lpips_distance(lpips_net, images, images.flip(-1))
    for path in (tmp_path / "squeeze.pth", tmp_path / "squeeze.safetensors"):
        model = build_lpips("squeeze", weights_path=str(path))
        assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
        assert torch.equal(model.net.state_dict()["slice7.12.expand3x3.weight"], state["features.12.expand3x3.weight"])
        assert not torch.allclose(lpips_distance(model, images, images.flip(-1)), other)

    # The torch hub cache is used when no path is given (where torchvision would have put it).
    cached = lpips_backbone_cache_path("squeeze")
    assert cached.parent == empty_hub / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert torch.equal(build_lpips("squeeze").net.slice1[0].weight, state["features.0.weight"])

    # A backbone of the wrong architecture is a one-line error naming the file.
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong\.pth: not torchvision squeezenet1_1") as err:
        build_lpips("squeeze", weights_path=tmp_path / "wrong.pth")
    assert "\n" not in str(err.value)


def test_lpips_is_frozen_and_not_saved(tmp_path, lpips_net):
    from safetensors.torch import load_file, save_file

    cfg = replace(OFF, lpips_weight=1.0, learned_logvar=True, disc_weight=0.5)
    loss_fn = VAELoss(cfg, lpips_model=lpips_net, **DISC).train()
    assert not loss_fn.lpips.training and not any(p.requires_grad for p in loss_fn.lpips.parameters())
    lpips_ids = {id(p) for p in loss_fn.lpips.parameters()}
    assert not lpips_ids & {id(p) for p in loss_fn.trainable_parameters()}
    state = loss_fn.state_module().state_dict()
    assert "logvar" in state and any(k.startswith("discriminator.main.") for k in state)
    assert not any("lpips" in k or "module." in k for k in state)
    # Checkpoints go through safetensors (LPIPS' aliased lin/lins tensors could not be saved).
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "loss.safetensors"))
    fresh = VAELoss(cfg, lpips_model=lpips_net, **DISC)
    fresh.state_module().load_state_dict(load_file(str(tmp_path / "loss.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(fresh.discriminator.state_dict().values(),
                                                  loss_fn.discriminator.state_dict().values(), strict=True))


def test_import_does_not_import_lpips():
    code = "import sys, sdvae.train.losses; assert 'lpips' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invalid_config_is_a_user_error():
    with pytest.raises(UserError, match=r"loss\.recon"):
        VAELoss(replace(OFF, recon="l2"))
    with pytest.raises(UserError, match="lpips_net"):
        build_lpips("resnet", random_backbone=True)
    with pytest.raises(UserError, match="kl_weight"):
        VAELoss(replace(OFF, kl_weight=-1.0))


# ---------------------------------------------------------------------------------------------------
# 6. mixed precision
# ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_is_finite_and_keeps_fp32_parameters(vae, lpips_net):
    cfg = replace(OFF, recon_weight=1.0, lpips_weight=1.0, kl_weight=1e-6, learned_logvar=True, disc_weight=0.5)
    loss_fn = VAELoss(cfg, lpips_model=lpips_net, **DISC)
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, mean, logvar = _forward(vae, images)
        assert recon.dtype == torch.bfloat16  # autocast is really on
        loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step=0, last_layer=decoder_last_layer(vae))
        d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=0)
    assert loss.dtype == d_loss.dtype == torch.float32
    assert all(math.isfinite(v) for v in {**logs, **d_logs}.values()) and logs["d_weight"] > 0
    (loss + d_loss).backward()
    params = [*vae.parameters(), *loss_fn.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


# ---------------------------------------------------------------------------------------------------
# DDP (2 CPU processes, gloo): the trainer's wiring
# ---------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Forward(nn.Module):  # the whole VAE pass in one DDP-wrapped module, as the trainer does
        def __init__(self, vae: nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x: torch.Tensor):
            return _forward(self.vae, x)

    vae = build_preset("test").train()
    model = DDP(Forward(vae))
    cfg = replace(OFF, recon_weight=1.0, kl_weight=1e-6, learned_logvar=True, disc_weight=0.5, disc_start=1)
    loss_fn = VAELoss(cfg, **DISC)
    loss_fn.discriminator = DDP(loss_fn.discriminator)  # what accelerator.prepare does
    opt = torch.optim.Adam([*vae.parameters(), *loss_fn.trainable_parameters()], lr=1e-3)
    disc_opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3)
    last = decoder_last_layer(model)
    for step in range(3):
        images = _images(seed=100 * step + rank)  # different data per rank
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon, mean, logvar = model(images)
            g_loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, step, last)
        g_loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d_loss, _ = loss_fn.discriminator_loss(images, recon, step)
        d_loss.backward()
        loss_fn.all_reduce_trainable_grads()
        opt.step()
        opt.zero_grad()
        if loss_fn.disc_active(step):
            disc_opt.step()
        disc_opt.zero_grad()
    assert logs["d_weight"] > 0
    params = [*vae.parameters(), *loss_fn.discriminator.parameters(), loss_fn.logvar]
    flat = torch.cat([p.detach().flatten() for p in params])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        Path(out).write_text(str(max((g - gathered[0]).abs().max().item() for g in gathered)))
    dist.barrier()
    dist.destroy_process_group()
    # The results are written. Leave without C++ static destructors: gloo's background threads
    # intermittently aborted the process there ("terminate called without an active exception").
    os._exit(0)


@pytest.mark.slow
def test_ddp_training_steps_keep_ranks_in_sync(tmp_path):
    """Adaptive weight on a DDP model, DDP discriminator, all-reduced logvar: ranks stay identical."""
    import torch.multiprocessing as mp

    out = tmp_path / "maxdiff.txt"
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2,
                           start_method="spawn")
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    assert float(out.read_text()) == 0.0


def test_lpips_distance_matches_the_package_and_runs_its_backbone_under_autocast(lpips_net) -> None:
    images = _images(3)
    recon = (images + 0.3 * _images(4)).clamp(-1, 1).requires_grad_(True)
    # Outside autocast: exactly lpips.LPIPS.forward.
    assert torch.equal(lpips_distance(lpips_net, images, recon), lpips_net(images, recon).flatten())
    # Under bf16 autocast the backbone runs in bf16 (that is the speed-up) and the result stays close,
    # fp32 and differentiable.
    convs = []
    hook = lpips_net.net.slice1[0].register_forward_hook(lambda m, i, o: convs.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips_distance(lpips_net, images, recon)
    hook.remove()
    assert convs == [torch.bfloat16, torch.bfloat16] and d.dtype == torch.float32
    torch.testing.assert_close(d, lpips_net(images, recon).flatten().detach(), rtol=0.05, atol=1e-3)
    (grad,) = torch.autograd.grad(d.sum(), recon)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
