"""Small ``nn.Module`` helpers for training: unwrapping DDP/compile wrappers, temporary freezing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def decoder_last_layer(vae: nn.Module) -> nn.Parameter:
    """The weight LDM balances the GAN against: ``decoder.conv_out.weight`` of the (unwrapped) VAE.

    Accepts the AutoencoderKL itself or wrappers of it (DDP, ``torch.compile``, a module holding it
    as ``.vae`` such as :class:`sdvae.train.vae_forward.VAEForward`); returns the very parameter tensor.
    """
    model = unwrap(vae)
    if not hasattr(model, "decoder") and isinstance(getattr(model, "vae", None), nn.Module):
        model = unwrap(model.vae)
    return model.decoder.conv_out.weight


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on ``module``'s parameters (restored afterwards).

    Autograd records at forward time whether a leaf needs a gradient, so a graph built inside this
    block never reaches these parameters, even when ``backward()`` runs after the block has exited.
    Gradient still flows *through* the module to its inputs.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
