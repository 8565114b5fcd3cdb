"""Gradient-norm balancing of one loss term against the reconstruction term (LDM's adaptive GAN weight).

Used by :class:`sdvae.train.losses.VAELoss` for the PatchGAN term (``loss.disc_adaptive_weight``) and by
:mod:`sdvae.train.alignment` for VA-VAE's VF loss (``loss.alignment_adaptive``).
"""

from __future__ import annotations

import torch

ADAPTIVE_EPS = 1e-4  # LDM: keeps λ finite when the adversarial gradient vanishes
ADAPTIVE_MAX = 1e4  # LDM's clamp on λ


def adaptive_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = ADAPTIVE_MAX
) -> torch.Tensor:
    """LDM's adaptive GAN weight ``clamp(‖∇_w nll‖ / (‖∇_w g_loss‖ + 1e-4), 0, max_weight)``, detached.

    Balances the adversarial gradient against the reconstruction gradient at the decoder's last layer
    ``w`` (VA-VAE balances its VF loss the same way at the encoder's last layer, ``max_weight`` 1e8).
    Uses ``torch.autograd.grad(..., retain_graph=True)``, which reads gradients without
    accumulating into ``.grad`` and without firing DDP's all-reduce hooks (those sit on gradient
    accumulation), so it works on a DDP-wrapped model as long as ``last_layer`` is the *parameter
    tensor itself* (take it from the unwrapped module, see :func:`sdvae.train.modules.decoder_last_layer`); it also
    works under autocast (parameters, hence these gradients, are fp32). Under ``torch.distributed``
    both gradients are averaged over the processes first, so λ is that of the global batch and N
    processes compute what 1 process computes (LDM computed λ per GPU from its local batch); every
    process must then call this the same number of times.

    Args:
        nll: 0-dim reconstruction(+perceptual) loss; may be constant (then λ = 0).
        g_loss: 0-dim generator adversarial loss, which must depend on ``last_layer``.
        last_layer: the parameter both losses are differentiated against.
        max_weight: upper clamp (LDM: 1e4).

    Returns:
        0-dim fp32 tensor without grad. 0 when gradients are disabled (evaluation under
        ``no_grad``, as LDM does) or when a gradient norm is not finite (e.g. an fp16 overflow).

    Raises:
        ValueError: ``g_loss`` does not depend on ``last_layer`` (the wrong tensor was passed, e.g. a
            parameter of a copy of the model, which would silently disable the GAN).
    """
    if not torch.is_grad_enabled() or not g_loss.requires_grad:
        return torch.zeros((), device=g_loss.device)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if g_grad is None:
        raise ValueError("adaptive_weight: the adversarial loss does not depend on last_layer; pass the "
                         "decoder's conv_out.weight of the model that produced the reconstruction")
    nll_grad = None
    if nll.requires_grad:
        (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)
    nll_grad = torch.zeros_like(g_grad) if nll_grad is None else nll_grad
    nll_grad, g_grad = _global_mean(nll_grad.float()), _global_mean(g_grad.float())
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_EPS)
    weight = weight.clamp(0.0, max_weight).detach()
    return torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))


def _global_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the processes of ``torch.distributed`` (``t`` itself without it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
