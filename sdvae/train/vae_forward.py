"""The training-time forward pass as one module, so DDP and autocast wrap all of it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch import nn

from sdvae.train.config import ModelConfig
from sdvae.train.modules import unwrap


def prepare_vae(vae: AutoencoderKL, cfg: ModelConfig, channels_last: bool = False) -> int:
    """Put ``vae`` in training shape as configured; returns how many blocks checkpoint their activations.

    Training mode; every parameter trainable except, with ``train_encoder: false``, the encoder and
    ``quant_conv`` (decoder-only fine-tuning); diffusers' gradient checkpointing with
    ``gradient_checkpointing: true``; channels-last weights with ``channels_last``.
    """
    vae.train().requires_grad_(True)
    if not cfg.train_encoder:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in vae.modules())


class VAEForward(nn.Module):
    """encode → reparameterize → decode in a single ``forward``.

    Calling ``vae.encode``/``vae.decode`` on the unwrapped model (as diffusers' reference training
    script does) bypasses DDP's gradient all-reduce hooks and accelerate's autocast. Wrapping the
    whole pass in one module and handing *that* to ``accelerator.prepare`` keeps both.

    Args:
        vae: the model being trained.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the VAE.

        Args:
            images: (B,C_img,H,W) in [-1, 1] (the model's image channels), H and W multiples of the factor.
            eps: (B,C,h,w) standard normal noise for the reparameterized draw
                z = mean + exp(logvar/2)·eps; None decodes the mean. Passing the noise in (see
                :func:`posterior_noise`) makes training independent of process count and RNG state.

        Returns:
            recon (B,C_img,H,W) ≈ [-1,1], posterior mean (B,C,h,w), posterior logvar (B,C,h,w).
        """
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean if eps is None else posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """The sampled latent z that :meth:`VAEForward.forward` decodes, from its outputs and the same noise.

    ``mean + exp(logvar/2)·eps`` (diffusers' ``posterior.std`` is ``exp(0.5·logvar)``), ``mean`` when
    ``eps`` is None: bit for bit the z inside the forward, attached to the encoder's graph. The
    diffusability regularisers (:mod:`sdvae.train.losses`) transform this z.

    Args:
        mean, logvar: (B,C,h,w) posterior parameters as the forward returns them.
        eps: (B,C,h,w) the noise the forward was given, or None.
    """
    return mean if eps is None else mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)


def latent_decoder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode(z) -> images`` of the VAE inside ``model``, for the loss terms that decode other latents.

    Args:
        model: a :class:`VAEForward`, possibly wrapped (DDP, ``torch.compile``).

    Returns:
        A callable mapping (B,c,h,w) latents to (B,C,f·h,f·w) images ≈ [-1, 1], attached to the graph.
        It calls the bare model: gradients of the decoder's parameters still go through DDP's all-reduce,
        whose hooks sit on the parameters and fire once per backward however often a parameter was used
        (the iteration's forward went through the wrapper), and autocast is whatever the caller holds.
    """
    bare = unwrap(model)
    vae = bare.vae if isinstance(bare, VAEForward) else bare

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample

    return decode


def compile_forward(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """``train.compile``: ``torch.compile`` the (DDP-wrapped) forward module, or return it unchanged.

    Compiled after ``accelerator.prepare`` so DDP's hooks stay outside the graph (DDPOptimizer splits it
    at bucket boundaries); ``accelerator.no_sync`` still reaches DDP through the wrapper.
    """
    return torch.compile(model, backend=backend) if enabled else model


def posterior_noise(indices: torch.Tensor, step: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Reparameterization noise that depends only on (seed, step, image index).

    Drawing ε per image from its own seeded generator (instead of the process's global RNG) makes a
    run with N processes see exactly the noise of a 1-process run over the same global batch, and a
    resumed run the noise of an uninterrupted one.

    Args:
        indices: (B,) dataset indices of the batch's images.
        step: micro-batch counter.
        shape: (C, h, w) latent shape.
        seed: run seed.

    Returns:
        (B,C,h,w) float32 standard normal noise on CPU.
    """
    out = torch.empty(len(indices), *shape)
    for row, index in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_000_019 + int(index))
        out[row] = torch.randn(shape, generator=g)
    return out
