"""Library helpers of tools/train.py: prepare_vae (checkpointing really on), measured latent statistics,
the synchronised discriminator BatchNorm outside DDP, TF32 flags, tracker config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdvae.model.build import build_preset
from sdvae.train.config import ModelConfig, RunConfig
from sdvae.train.vae_forward import VAEForward, prepare_vae


@pytest.mark.parametrize("on", [True, False])
def test_prepare_vae_gradient_checkpointing_recomputes_in_backward(monkeypatch, on: bool):
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    vae = build_preset("test")
    blocks = prepare_vae(vae, ModelConfig(gradient_checkpointing=on))
    recon, _, _ = VAEForward(vae)(torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 4, 4, 4))
    recon.mean().backward()
    assert (blocks > 0 and len(calls) > 0) if on else (blocks == 0 and not calls)


def test_prepare_vae_freezes_the_encoder_for_decoder_only_fine_tuning():
    vae = build_preset("test")
    prepare_vae(vae, ModelConfig(train_encoder=False))
    assert vae.training
    assert not any(p.requires_grad for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()])
    assert all(p.requires_grad for p in vae.decoder.parameters())


def test_posterior_stats_is_latent_stats_math():
    from sdvae.latents.stats import posterior_stats

    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(3, 4, 5, 6, generator=g) + 0.3, torch.randn(3, 4, 5, 6, generator=g) * 0.5 - 2)
             for _ in range(3)]
    stats = posterior_stats(pairs)
    mean = np.concatenate([m.double().numpy() for m, _ in pairs])
    var = np.concatenate([np.exp(lv.double().numpy()) for _, lv in pairs])
    # Law of total variance: Var[z] = Var[mean] + E[σ²], over images, positions and channels.
    assert stats.rows == 9 and stats.over == "posterior"
    assert stats.mean == pytest.approx(mean.mean(), rel=1e-12)
    assert stats.std == pytest.approx(np.sqrt(mean.var() + var.mean()), rel=1e-12)
    assert stats.channel_std[1] == pytest.approx(np.sqrt(mean[:, 1].var() + var[:, 1].mean()), rel=1e-12)
    assert stats.scaling_factor == pytest.approx(1 / stats.std)


def test_write_measured_scaling_keeps_the_models_form(tmp_path):
    import json

    from sdvae.latents.stats import posterior_stats
    from sdvae.train.validation import write_measured_scaling

    stats = posterior_stats([(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))])
    (tmp_path / "config.json").write_text(json.dumps({"latent_channels": 4, "scaling_factor": 0.18215,
                                                      "shift_factor": None}))
    written = write_measured_scaling(tmp_path, stats)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1.0) and config["shift_factor"] is None
    assert "shift_factor" not in written
    (tmp_path / "config.json").write_text(json.dumps({"latent_channels": 4, "scaling_factor": 0.3611,
                                                      "shift_factor": 0.1159}))
    write_measured_scaling(tmp_path, stats)
    assert json.loads((tmp_path / "config.json").read_text())["shift_factor"] == pytest.approx(1.0)


def test_sync_batchnorm_is_batchnorm_without_torch_distributed():
    from sdvae.train.discriminator import NLayerDiscriminator, SyncBatchNorm2d

    disc = NLayerDiscriminator(3, 8, 2, "batch")
    assert any(isinstance(m, SyncBatchNorm2d) for m in disc.modules())
    x = torch.randn(2, 8, 5, 5)
    sync, plain = SyncBatchNorm2d(8), torch.nn.BatchNorm2d(8)
    assert torch.equal(sync(x), plain(x)) and torch.equal(sync.running_var, plain.running_var)


def test_allow_tf32_sets_both_backend_flags():
    from sdvae.train.launch import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tracker_config_is_flat_scalars():
    from sdvae.train.launch import tracker_config

    flat = tracker_config(RunConfig())
    assert flat["log.with"] == "tensorboard" and flat["train.mixed_precision"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_compile_forward_wraps_and_matches_eager_and_channels_last_weights():
    vae = build_preset("test")
    prepare_vae(vae, ModelConfig(), channels_last=True)
    assert vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    from sdvae.train.vae_forward import compile_forward

    model = VAEForward(vae)
    assert compile_forward(model, False) is model
    compiled = compile_forward(model, True, backend="eager")  # inductor needs a C++ toolchain and minutes on CPU
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    x, eps = torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 4, 4, 4)
    assert torch.allclose(compiled(x, eps)[0], model(x, eps)[0], atol=1e-5)
