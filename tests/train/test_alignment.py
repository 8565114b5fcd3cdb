"""VA-VAE's alignment regulariser (``loss.alignment``, issue 36 part 3): backbone loading, VF loss, training.

The frozen backbone is a tiny randomly initialised DINOv2-architecture timm ViT (patch 14, width 32, two
blocks) saved to a safetensors file and read back through :func:`load_backbone`, never downloaded. The
VAE is the micro `test` preset (f = 8) on 32×32 images: 4×4 latents, so the backbone sees 56×56 images.
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
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import REPO, kill_when_written, make_photo, seeded_train_vae, uniform_images
from sdvae.errors import UserError
from sdvae.train.alignment import (
    FrozenBackbone,
    encoder_last_layer,
    load_backbone,
    marginal_cosine_loss,
    marginal_distance_matrix_loss,
    vf_loss,
)
from sdvae.train.config import LossConfig, RunConfig, load_config
from sdvae.train.losses import VAELoss
from sdvae.train.modules import decoder_last_layer
from sdvae.train.vae_forward import VAEForward, latent_decoder, posterior_noise, reparameterize

timm = pytest.importorskip("timm")

NAME = "vit_small_patch14_dinov2"
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
HUB_ID = "timm/vit_small_patch14_dinov2.lvd142m"
BASE = LossConfig(recon_weight=1.0, lpips_weight=0.0, kl_weight=0.0, disc_weight=0.0)
LATENT_SHAPE = (4, 4, 4)


def _tiny_vit(**kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model(NAME, num_classes=0, **TINY, **kwargs)
        for p in vit.parameters():  # DINOv2's layer scale starts at 1e-5: make the blocks matter
            p.data.add_(0.02 * torch.randn_like(p))
        return vit


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("backbone")
    save_file({k: v.contiguous() for k, v in _tiny_vit().state_dict().items()}, folder / "model.safetensors")
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def backbone(weights: Path) -> FrozenBackbone:
    return load_backbone(weights, NAME, **TINY)


def _aligned(**change) -> LossConfig:
    return replace(BASE, **{"alignment": 0.7, "alignment_backbone": "unused: the backbone is passed in", **change})


# ---------------------------------------------------------------------------------------------------
# backbone loading
# ---------------------------------------------------------------------------------------------------


def test_backbone_is_read_from_the_local_file_frozen_and_gives_features_on_the_latent_grid(weights, backbone):
    reference = _tiny_vit(dynamic_img_size=True).eval()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in backbone.vit.state_dict().items())
    assert load_backbone(weights.parent, NAME, **TINY).vit.state_dict().keys() == backbone.vit.state_dict().keys()
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.patch == (14, 14) and backbone.feature_dim == 32

    images = uniform_images(size=32)
    features = backbone(images, (4, 3))  # a non-square grid: rows and columns must not be swapped
    assert features.shape == (2, 32, 4, 3) and features.dtype == torch.float32
    # A target: no graph is kept, even for inputs that require a gradient.
    assert not backbone(images.clone().requires_grad_(), (4, 3)).requires_grad
    # Independently: [-1, 1] → [0, 1] → 56×42 pixels → ImageNet normalisation → timm's own NCHW patch map.
    x = F.interpolate((images + 1) / 2, size=(56, 42), mode="bilinear", antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    (expected,) = reference.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_missing_or_wrong_backbone_is_a_one_line_error_naming_the_file(tmp_path, weights):
    with pytest.raises(UserError) as err:
        load_backbone(tmp_path / "nothere.safetensors", NAME, **TINY)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nothere.safetensors") in message
    assert f"hf download {HUB_ID} model.safetensors" in message
    with pytest.raises(UserError, match=rf"{tmp_path / 'model.safetensors'}: no such file"):
        load_backbone(tmp_path, NAME, **TINY)  # a folder without model.safetensors
    with pytest.raises(UserError, match=r"cannot load it as vit_small_patch14_dinov2 \(RuntimeError: ") as err:
        load_backbone(weights, NAME, embed_dim=32, depth=3, num_heads=2)  # another architecture
    assert "\n" not in str(err.value) and str(weights) in str(err.value)
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"expected a \.safetensors file"):
        load_backbone(tmp_path / "model.bin", NAME)
    with pytest.raises(UserError, match=r"loss\.alignment_model: 'dinov3_huge' is not a timm model name"):
        load_backbone(weights, "dinov3_huge")


def test_missing_timm_names_the_extra(monkeypatch, weights):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs the optional package 'timm'.*pip install 'sdvae\[align\]'"):
        load_backbone(weights, NAME)


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------


def test_config_is_off_by_default_and_bad_values_are_one_line_errors():
    cfg = LossConfig()
    assert cfg.alignment == 0.0 and not cfg.alignment_adaptive
    assert (cfg.alignment_model, cfg.alignment_cos_margin, cfg.alignment_distmat_margin) == (
        "vit_large_patch14_dinov2", 0.5, 0.25)  # VA-VAE's
    loaded = load_config(None, ["--loss.alignment=0.1", "--loss.alignment_backbone=/w/dinov2",
                                "--loss.alignment_adaptive=true"]).loss
    assert (loaded.alignment, loaded.alignment_backbone, loaded.alignment_adaptive) == (0.1, "/w/dinov2", True)
    with pytest.raises(UserError, match=r"loss\.alignment_backbone: empty, but loss\.alignment > 0") as err:
        LossConfig(alignment=0.1)
    assert "\n" not in str(err.value) and "hf download timm/vit_large_patch14_dinov2.lvd142m" in str(err.value)
    with pytest.raises(UserError, match=r"loss\.alignment: must be >= 0"):
        LossConfig(alignment=-1.0)
    with pytest.raises(UserError, match=r"loss\.alignment_cos_margin: must be in \[0, 2\] .*, got -0\.1"):
        LossConfig(alignment_cos_margin=-0.1)
    with pytest.raises(UserError, match=r"loss\.alignment_distmat_margin: must be in \[0, 2\] .*, got 3"):
        load_config(None, ["--loss.alignment_distmat_margin=3"])
    with pytest.raises(UserError, match=r"loss\.alignment: aligns the encoder's latents, but model\.train_encoder"):
        load_config(None, ["--loss.alignment=0.1", "--loss.alignment_backbone=x", "--model.train_encoder=false"])
    assert RunConfig().loss.alignment == 0.0


# ---------------------------------------------------------------------------------------------------
# the VF loss
# ---------------------------------------------------------------------------------------------------


def _reference_vf(z: torch.Tensor, f: torch.Tensor, m1: float, m2: float) -> tuple[float, float]:
    """Both terms position by position in float64 Python loops (a separate computation from the module's)."""
    z, f = z.double(), f.double()
    b, _, h, w = z.shape
    n = h * w
    zv, fv = z.flatten(2), f.flatten(2)

    def cos(a: torch.Tensor, c: torch.Tensor) -> float:
        return float(a @ c / (a.norm() * c.norm()))

    mcos = sum(max(0.0, 1 - m1 - cos(zv[k, :, i], fv[k, :, i])) for k in range(b) for i in range(n)) / (b * n)
    mdms = sum(max(0.0, abs(cos(zv[k, :, i], zv[k, :, j]) - cos(fv[k, :, i], fv[k, :, j])) - m2)
               for k in range(b) for i in range(n) for j in range(n)) / (b * n * n)
    return mcos, mdms


@pytest.mark.parametrize("margins", [(0.0, 0.0), (0.5, 0.25), (0.9, 0.05)])
def test_vf_loss_is_its_formula(margins):
    g = torch.Generator().manual_seed(0)
    z, f = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 6, 3, 4, generator=g)
    total, mcos, mdms = vf_loss(z, f, *margins)
    ref_cos, ref_dms = _reference_vf(z, f, *margins)
    assert float(mcos) == pytest.approx(ref_cos, rel=1e-5, abs=1e-7)
    assert float(mdms) == pytest.approx(ref_dms, rel=1e-5, abs=1e-7)
    assert float(total) == pytest.approx(ref_cos + ref_dms, rel=1e-5)
    assert ref_cos > 0 and ref_dms > 0  # random directions: both terms active at these margins
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision step still gets fp32 cosines
        assert [float(t) for t in vf_loss(z, f, *margins)] == pytest.approx([float(total), float(mcos), float(mdms)],
                                                                           rel=1e-6)


def test_vf_loss_vanishes_on_the_features_and_margins_switch_positions_off():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 8, 4, 4, generator=g)
    scale = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    assert float(vf_loss(f * scale, f)[0]) == 0.0  # cosines ignore each position's length
    assert float(vf_loss(f, f, 0.0, 0.0)[0]) < 1e-6
    # One direction e0 for every feature, latents at known angles θ_i to it (2-D, so cos(z_i, z_j) = cos(θ_i − θ_j)).
    theta = torch.tensor([0.0, 0.3, 1.0, 2.0])
    z = torch.stack([theta.cos(), theta.sin()]).view(1, 2, 2, 2)
    f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    for m1 in (0.0, 0.2, 0.5, 1.5, 2.0):
        expected = sum(max(0.0, 1 - m1 - math.cos(t)) for t in theta.tolist()) / 4
        assert float(marginal_cosine_loss(z, f, m1)) == pytest.approx(expected, abs=1e-6)
    for m2 in (0.0, 0.25, 1.0, 2.0):
        expected = sum(max(0.0, abs(math.cos(a - b) - 1) - m2) for a in theta.tolist() for b in theta.tolist()) / 16
        assert float(marginal_distance_matrix_loss(z, f, m2)) == pytest.approx(expected, abs=1e-6)
    assert float(marginal_cosine_loss(z, f, 0.2)) > float(marginal_cosine_loss(z, f, 0.5)) > 0
    assert float(marginal_cosine_loss(z, f, 2.0)) == float(marginal_distance_matrix_loss(z, f, 2.0)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        vf_loss(z, f[:, :, :1])


# ---------------------------------------------------------------------------------------------------
# in the training loss
# ---------------------------------------------------------------------------------------------------


def _forward(model: VAEForward, images: torch.Tensor, position: int = 0):
    eps = posterior_noise(torch.arange(len(images)), position, LATENT_SHAPE, seed=0)
    recon, mean, logvar = model(images, eps)
    return recon, mean, logvar, reparameterize(mean, logvar, eps)


def test_alignment_term_trains_encoder_and_projection_but_never_the_backbone(backbone):
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images()
    recon, mean, logvar, z = _forward(model, images)
    loss_fn = VAELoss(_aligned(), alignment_backbone=backbone).train()
    assert not backbone.training  # stays in eval mode inside the loss
    proj = loss_fn.alignment.projection
    assert loss_fn.trainable_parameters() == [proj.proj.weight] and proj.proj.weight.shape == (32, 4, 1, 1)
    # The main term sees a detached reconstruction: every VAE gradient below is the alignment term's.
    loss, logs = loss_fn.generator_loss(images, recon.detach(), mean, logvar, 0, latents=z)
    with torch.no_grad():
        expected = vf_loss(proj(z), backbone(images, (4, 4)))
    assert logs["alignment"] == pytest.approx(float(expected[0]), rel=1e-6)
    assert (logs["alignment_cos"], logs["alignment_distmat"]) == pytest.approx([float(e) for e in expected[1:]])
    assert logs["loss"] == pytest.approx(logs["nll"] + 0.7 * logs["alignment"], rel=1e-6)
    assert set(logs) == {"loss", "rec", "nll", "alignment", "alignment_cos", "alignment_distmat", "kl", "kl_bpd"}
    loss.backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert encoder_last_layer(model).grad.abs().sum() > 0
    assert proj.proj.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad is None  # the decoder is not on the term's path
    assert all(p.grad is None for p in backbone.parameters())
    with pytest.raises(ValueError, match="needs the sampled latents"):
        loss_fn.generator_loss(images, recon.detach(), mean, logvar, 0)


def test_adaptive_weight_is_vavaes_gradient_ratio_at_the_encoders_last_layer(backbone):
    vae = seeded_train_vae()
    model = VAEForward(vae)
    images = uniform_images()
    recon, mean, logvar, z = _forward(model, images)
    loss_fn = VAELoss(_aligned(alignment=0.1, alignment_adaptive=True), alignment_backbone=backbone)
    layer = encoder_last_layer(vae)
    _, logs = loss_fn.generator_loss(images, recon, mean, logvar, 0, latents=z, encoder_last_layer=layer)
    nll = (recon - images).abs().mean()
    vf = vf_loss(loss_fn.alignment.projection(z), backbone(images, (4, 4)))[0]
    (g_nll,) = torch.autograd.grad(nll, layer, retain_graph=True)
    (g_vf,) = torch.autograd.grad(vf, layer)
    assert logs["alignment_weight"] == pytest.approx(0.1 * float(g_nll.norm() / (g_vf.norm() + 1e-4)), rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["nll"] + logs["alignment_weight"] * logs["alignment"], rel=1e-6)
    with pytest.raises(ValueError, match=r"needs generator_loss\(encoder_last_layer=...\)"):
        loss_fn.generator_loss(images, recon, mean, logvar, 0, latents=z)


def test_projection_is_checkpointed_with_the_loss_and_the_backbone_is_not(tmp_path, backbone):
    cfg = _aligned(learned_logvar=True, disc_weight=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        plain = VAELoss(replace(cfg, alignment=0.0), disc_ndf=8)
        torch.manual_seed(3)
        loss_fn = VAELoss(cfg, disc_ndf=8, alignment_backbone=backbone)
    # Built after the discriminator: switching alignment on leaves the discriminator's initial weights alone.
    assert all(torch.equal(a, b) for a, b in zip(plain.discriminator.state_dict().values(),
                                                  loss_fn.discriminator.state_dict().values(), strict=True))
    state = loss_fn.state_module().state_dict()
    assert "alignment_projection.proj.weight" in state
    assert not any(k.startswith("alignment_backbone") or ".vit." in k for k in state)
    assert set(state) - {"alignment_projection.proj.weight"} == set(plain.state_module().state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "loss.safetensors"))
    fresh = VAELoss(cfg, disc_ndf=8, alignment_backbone=backbone)
    assert not torch.equal(fresh.alignment.projection.proj.weight, loss_fn.alignment.projection.proj.weight)
    fresh.state_module().load_state_dict(load_file(str(tmp_path / "loss.safetensors")))
    assert torch.equal(fresh.alignment.projection.proj.weight, loss_fn.alignment.projection.proj.weight)
    assert fresh.trainable_parameters() == [fresh.logvar, fresh.alignment.projection.proj.weight]


def _train(cfg: LossConfig, new_path: bool, backbone: FrozenBackbone | None = None,
           steps: int = 2) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """tools/train.py's step for a few steps; ``new_path``: the call with latents, decode and the encoder's
    last layer (as tools/train.py makes it now), else the call of before the regularisers existed."""
    vae = seeded_train_vae()
    model = VAEForward(vae)
    loss_fn = VAELoss(cfg, alignment_backbone=backbone)
    opt = torch.optim.AdamW([*vae.parameters(), *loss_fn.trainable_parameters()], lr=1e-3, betas=(0.5, 0.9))
    last_layer, decode = decoder_last_layer(vae), latent_decoder(model)
    logs = []
    for step in range(steps):
        images = uniform_images(seed=step, batch=3)
        eps = posterior_noise(torch.arange(3) + 3 * step, step, LATENT_SHAPE, seed=0)
        recon, mean, logvar = model(images, eps)
        if new_path:
            loss, log = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer,
                                               latents=reparameterize(mean, logvar, eps), decode=decode,
                                               encoder_last_layer=encoder_last_layer(vae))
        else:
            loss, log = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*vae.parameters(), *loss_fn.trainable_parameters()], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append(log)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}, logs


def test_weight_zero_step_is_bit_identical_to_the_step_without_alignment(backbone):
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    before, before_logs = _train(LossConfig(), new_path=False)
    off = LossConfig(alignment=0.0, alignment_backbone="/never/read", alignment_adaptive=True)
    after, after_logs = _train(off, new_path=True)
    assert torch.equal(torch.get_rng_state(), rng)  # no projection initialised from the global RNG
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after_logs == before_logs
    off_loss = VAELoss(off)
    assert off_loss.alignment is None and off_loss.trainable_parameters() == []
    assert set(off_loss.state_module().state_dict()) == set()
    # Switched on, the same run changes (the comparison above can fail).
    on, on_logs = _train(replace(off, alignment=0.5, alignment_adaptive=False), new_path=True, backbone=backbone)
    assert not all(torch.equal(before[k], on[k]) for k in before)
    assert "alignment" in on_logs[0]


# ---------------------------------------------------------------------------------------------------
# tools/train.py end to end
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_with_alignment_resumes_bit_exact(tmp_path):
    """Killed after the step-4 checkpoint and resumed to 8 == an uninterrupted 8-step run, projection included."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(make_photo(40 + i % 3, 36, seed=i)).save(images / f"{i}.png")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("test_vit", num_classes=0)  # timm's own tiny test ViT (patch 16)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "configs" / "test.yaml"),
                f"--data.train={images}", f"--train.out={out}", "--train.steps=8", "--train.checkpoint_every=2",
                "--train.val_every=8", "--log.with=none", "--loss.alignment=0.5", "--loss.alignment_adaptive=true",
                f"--loss.alignment_backbone={tmp_path}", "--loss.alignment_model=test_vit"]

    def run(out: Path) -> None:
        proc = subprocess.run(cmd(out), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "straight")
    kill_when_written(cmd(tmp_path / "resumed"), tmp_path / "resumed" / "checkpoints" / "step-00000004", env)
    run(tmp_path / "resumed")
    finals = [load_file(tmp_path / run / "final" / "diffusion_pytorch_model.safetensors")
              for run in ("straight", "resumed")]
    assert finals[0].keys() == finals[1].keys() and all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert not any("alignment" in k for k in finals[0])  # not exported with the VAE
    losses = [load_file(tmp_path / run / "checkpoints" / "step-00000008" / "loss.safetensors")
              for run in ("straight", "resumed")]
    assert set(losses[0]) == {"alignment_projection.proj.weight"}
    assert torch.equal(losses[0]["alignment_projection.proj.weight"], losses[1]["alignment_projection.proj.weight"])
