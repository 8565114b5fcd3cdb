"""All training-loss math for KL autoencoders: reconstruction, LPIPS, KL, PatchGAN and diffusability terms.

The training script only calls :class:`VAELoss`. The objective is LDM's ``LPIPSWithDiscriminator``
(the loss the Stable Diffusion VAEs were trained with), with the defects of diffusers' reference
``train_autoencoderkl.py`` avoided: LPIPS carries gradient (it is never computed under ``no_grad``),
the discriminator step only sees detached reconstructions, and the generator step sends no gradient
into the discriminator. The frozen LPIPS network is built (from local weight files only) by
:func:`sdvae.metrics.lpips.build_lpips`; the LPIPS distance term is computed here.

Reduction convention (read this before changing a weight)
---------------------------------------------------------
LDM sums every per-pixel term over ``C·H·W`` and averages over the batch (so its loss grows with the
image size), and adds ``kl_weight`` times the KL in nats per image. Here **every term is LDM's divided
by the number of image elements** ``D = C·H·W`` (C image channels, 3 for RGB)::

    nll   = recon_weight·mean|x − x̂|  (or mean (x − x̂)²)  + lpips_weight·mean LPIPS(x, x̂)
    nll   = nll / exp(s) + s                                 (only with learned_logvar; s scalar)
    total = nll + w_eq·R(τ) + w_se·R(½) + w_al·VF + kl_weight·KL/D + λ·G_adv   (λ: see below; 0 before disc_start)

where ``KL`` is :func:`kl_divergence` (nats per image: summed over the latent C·h·w, averaged over
the batch) and ``mean`` is over batch and all pixels. Because the total is exactly LDM's loss / D,
LDM's hyper-parameters keep their meaning (``kl_weight=1e-6``, ``lpips_weight=1``, adaptive
``disc_weight=0.5``) at every resolution, while the numbers stay O(1) (readable logs, a meaningful
``grad_clip``). Adding ``KL`` un-normalised to a per-element mean instead would weight the KL
``C·H·W`` times (≈2·10⁵ at 256² RGB) more than LDM does. The logged ``kl`` is in nats per image (what LDM
logs), ``kl_bpd`` the same in bits per image dimension.

Adversarial weight: with ``disc_adaptive_weight`` (LDM),
``λ = disc_weight · clamp(‖∇_w nll‖ / (‖∇_w G_adv‖ + 1e-4), 0, 1e4)`` with ``w`` the decoder's last
weight. λ scales with ``nll``, so λ·G_adv keeps LDM's size relative to the other terms (only the
1e4 clamp, applied to this D-times smaller λ, binds later than LDM's; it matters only when the
adversarial gradient all but vanishes). Without it ``λ = disc_weight`` relative to the per-element
``nll`` above (LDM has no such mode).

Learned log-variance: LDM defines ``nll = rec / exp(s) + s`` with a learnable scalar ``s`` but its
``configure_optimizers`` never gives ``s`` to an optimizer, so in LDM's code it stays at ``s = 0``
(``nll = rec``). ``learned_logvar=True`` really learns it (via :meth:`VAELoss.trainable_parameters`).

Diffusability regularisers (off by default): ``R(τ) = recon_weight·mean|τ(x) − decode(τ(z))|`` (or squared)
``+ lpips_weight·mean LPIPS(τ(x), decode(τ(z)))``, the reconstruction term without the learned logvar on a
transformed pair, ``z`` the sampled latent the main term decodes; ``loss.equivariance`` (EQ-VAE) draws τ per
micro-batch, ``loss.scale_equivariance`` uses ×½ box downsampling. The pairs: :mod:`sdvae.train.regularisers`.
``loss.alignment`` (VA-VAE): ``VF`` aligns a trained projection of ``z`` with a frozen backbone's features of ``x``,
weighted by ``w_al`` (fixed or adaptive); :class:`sdvae.train.alignment.VFAlignment` holds it all.

Image channels other than RGB (:mod:`sdvae.images.channels`): the reconstruction, KL and PatchGAN terms take
all C channels; LPIPS, an RGB network, sees the RGB view (a grayscale image repeated to three channels, an
RGBA image without its alpha), so an RGBA model's alpha is learned from the other terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from sdvae.images.channels import rgb_view
from sdvae.metrics.information import bits_per_dim, gaussian_kl
from sdvae.metrics.lpips import build_lpips, lpips_distance
from sdvae.train.adaptive import adaptive_weight
from sdvae.train.alignment import FrozenBackbone, VFAlignment
from sdvae.train.discriminator import NLayerDiscriminator, Norm, generator_adv_loss, hinge_d_loss, vanilla_d_loss
from sdvae.train.modules import frozen, unwrap
from sdvae.train.regularisers import transformed_pairs

if TYPE_CHECKING:
    from sdvae.train.config import LossConfig

# --------------------------------------------------------------------------------------------------
# Elementary terms
# --------------------------------------------------------------------------------------------------


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL( N(mean, exp(logvar)) ‖ N(0, I) ) in nats per image.

    ``0.5 · Σ (mean² + exp(logvar) − 1 − logvar)`` **summed over all latent dimensions (C, h, w) and
    averaged over the batch** — LDM's ``posterior.kl()`` followed by ``sum / B``. Computed in fp32
    whatever the input dtype (under autocast the posterior may arrive in bf16/fp16).

    Args:
        mean: (B, C, h, w) posterior mean.
        logvar: (B, C, h, w) posterior log-variance (diffusers clamps it to [-30, 20]).

    Returns:
        0-dim fp32 tensor, ≥ 0.
    """
    return gaussian_kl(mean, logvar).mean()



def reconstruction_loss(images: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element mean L1 (``"l1"``) or squared error (``"mse"``), in fp32.

    Args:
        images: (B, 3, H, W) targets in [-1, 1].
        recon: (B, 3, H, W) reconstructions (≈ [-1, 1], not clamped: clamping would cut the gradient).

    Returns:
        0-dim fp32 tensor.
    """
    diff = recon.float() - images.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.square().mean()
    raise ValueError(f"reconstruction_loss: kind must be 'l1' or 'mse', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# The training objective
# --------------------------------------------------------------------------------------------------


class _LossState(nn.Module):
    """What of :class:`VAELoss` belongs in a checkpoint: the learned logvar, the bare discriminator and the
    alignment projection (each only when there is one: a run without it saves the keys it always saved)."""

    def __init__(self, logvar: nn.Parameter | None, discriminator: nn.Module | None,
                 alignment_projection: nn.Module | None) -> None:
        super().__init__()
        self.logvar = logvar
        self.discriminator = discriminator
        self.alignment_projection = alignment_projection


class VAELoss(nn.Module):
    """LDM's ``LPIPSWithDiscriminator`` objective, split into a generator and a discriminator step.

    Holds the frozen LPIPS network (when ``lpips_weight > 0``), the learned scalar log-variance (when
    ``learned_logvar``), the PatchGAN (when ``disc_weight > 0``; otherwise ``discriminator`` is
    None) and VA-VAE's term (when ``alignment > 0``; else ``alignment`` is None). The VAE itself is the caller's.

    Optimizers: put :meth:`trainable_parameters` (the logvar, the alignment projection) with the VAE's parameters,
    and ``discriminator.parameters()`` in their own optimizer. LPIPS and the alignment backbone have no trainable
    parameters and are excluded from :meth:`state_module` (checkpoints) — neither is part of the VAE either.

    DDP: the trainer may replace ``self.discriminator`` with its DDP-wrapped version (e.g.
    ``loss.discriminator = accelerator.prepare(loss.discriminator)``). :meth:`discriminator_loss`
    then runs through the wrapper (its gradients are all-reduced), while :meth:`generator_loss` calls
    the bare module (:func:`unwrap`): the generator step needs no discriminator gradient, so a DDP
    forward there would only add a buffer broadcast (and, with ``find_unused_parameters``, a graph
    search) per step, and would rely on how DDP's reducer treats a backward that yields none of its
    gradients. The logvar is not inside any DDP module; call :meth:`all_reduce_trainable_grads`
    before clipping and the optimizer step in multi-process runs, or the ranks' logvars drift apart.

    Args:
        cfg: the loss section of the run config.
        lpips_model: use this LPIPS module instead of building one from ``cfg`` (tests, sharing).
        random_lpips_backbone: build LPIPS with a random backbone (tests; never for training).
        disc_ndf: width of the discriminator's first layer (LDM: 64).
        disc_norm: discriminator normalisation, ``"batch"`` (LDM's, synchronised under DDP), ``"group"``
            or ``"none"``; None: ``cfg.disc_norm``.
        logvar_init: initial value of the learned log-variance (LDM: 0).
        image_channels: the VAE's image channels C (1, 3 or 4): what the discriminator judges.
        latent_channels, alignment_backbone: the VAE's latent channels c (the alignment projection's input) and a
            frozen backbone to use instead of loading ``cfg.alignment_backbone`` (tests).
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        lpips_model: nn.Module | None = None,
        random_lpips_backbone: bool = False,
        disc_ndf: int = 64,
        disc_norm: Norm | None = None,
        logvar_init: float = 0.0,
        image_channels: int = 3,
        latent_channels: int = 4,
        alignment_backbone: FrozenBackbone | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg  # validated where it is defined (LossConfig)
        self.lpips: nn.Module | None = None
        if cfg.lpips_weight > 0:
            self.lpips = lpips_model if lpips_model is not None else build_lpips(
                cfg.lpips_net, cfg.lpips_weights, random_backbone=random_lpips_backbone)
            self.lpips.eval().requires_grad_(False)
        self.logvar: nn.Parameter | None
        if cfg.learned_logvar:
            self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        else:
            self.register_parameter("logvar", None)
        self.discriminator: nn.Module | None = None
        if cfg.disc_weight > 0:
            self.discriminator = NLayerDiscriminator(image_channels, disc_ndf, cfg.disc_layers,
                                                     disc_norm or cfg.disc_norm)
        self.alignment = (VFAlignment.from_config(cfg, latent_channels, alignment_backbone) if cfg.alignment > 0
                          else None)  # built last: the discriminator's initial weights do not depend on it

    # -- bookkeeping ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> VAELoss:
        """Switch the discriminator's mode; LPIPS (and the alignment backbone) stay in eval mode (no dropout)."""
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """This module's own trainable parameters (the learned logvar, the alignment projection, if any) — not the
        discriminator's."""
        own = [self.logvar] if self.logvar is not None else []
        return own + (list(self.alignment.projection.parameters()) if self.alignment is not None else [])

    def state_module(self) -> nn.Module:
        """A module whose ``state_dict`` is what to checkpoint: ``logvar``, ``discriminator.*`` and
        ``alignment_projection.*`` (the projection, not the exported VAE's, is trained state of the run).

        Keys never carry a DDP ``module.`` prefix (the bare discriminator is used), so checkpoints
        move between process counts; LPIPS and the alignment backbone (frozen, rebuilt from their files) are
        left out.
        ``load_state_dict`` on the returned module writes into this loss's own tensors.
        """
        disc = unwrap(self.discriminator) if self.discriminator is not None else None
        return _LossState(self.logvar, disc, self.alignment.projection if self.alignment is not None else None)

    def all_reduce_trainable_grads(self) -> None:
        """Average :meth:`trainable_parameters`' gradients over processes (no-op without torch.distributed).

        Needed because the logvar and the alignment projection live outside the DDP-wrapped VAE, so nothing else
        synchronises them.
        Call after the last backward of an accumulation and before clipping / the optimizer step.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for p in self.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= dist.get_world_size()

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms count at ``step`` (LDM: from ``step >= disc_start`` on)."""
        return self.discriminator is not None and step >= self.cfg.disc_start

    def _bare_discriminator(self) -> nn.Module:
        assert self.discriminator is not None
        return unwrap(self.discriminator)

    @staticmethod
    def _to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        # One device→host copy for all log values instead of one synchronising .item() per value.
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                               for v in values.values()])
        return dict(zip(values, stacked.tolist(), strict=True))

    # -- generator (VAE) step ---------------------------------------------------------------------

    def _nll(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LDM's reconstruction (+ perceptual) term as a per-element mean, through the learned logvar if any.

        Returns:
            (nll, logs with ``rec``, ``lpips`` (if enabled), ``logvar`` (if learned) and ``nll``).
        """
        cfg = self.cfg
        logs: dict[str, torch.Tensor] = {}
        with contextlib.nullcontext() if cfg.recon_weight > 0 else torch.no_grad():
            rec = reconstruction_loss(images, recon, cfg.recon)
        logs["rec"] = rec
        nll = cfg.recon_weight * rec if cfg.recon_weight > 0 else rec.new_zeros(())
        if self.lpips is not None:
            lp = lpips_distance(self.lpips, rgb_view(images), rgb_view(recon)).mean()  # RGB network
            logs["lpips"] = lp
            nll = nll + cfg.lpips_weight * lp
        if self.logvar is not None:
            # LDM: nll = rec / exp(s) + s with one learned scalar s. For L1 that is the Laplace NLL
            # with scale b = exp(s) up to log 2 — "logvar" is LDM's name, not a variance.
            # exp(s) is a scalar, so mean(r/e^s + s) = mean(r)/e^s + s.
            logvar = self.logvar.float()
            nll = nll / logvar.exp() + logvar
            logs["logvar"] = logvar
        logs["nll"] = nll
        return nll, logs

    def generator_loss(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        posterior_mean: torch.Tensor,
        posterior_logvar: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
        *,
        latents: torch.Tensor | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tau: str | None = None,
        encoder_last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the VAE (and logvar, alignment projection) update.

        ``total = nll + w_eq·R(τ) + w_se·R(½) + w_al·VF + kl_weight·KL/D + λ·G_adv`` (see the module docstring;
        D = C·H·W). Terms whose weight is 0 are left out of the graph (their value is still logged, except
        the regularisers', not computed at all). The discriminator is frozen while it judges ``recon``: its
        parameters get no gradient from this loss (so a ``discriminator_loss`` backward in the same
        iteration is not contaminated), while ``recon`` does receive the adversarial gradient.

        Args:
            images: (B, C, H, W) targets in [-1, 1].
            recon: (B, C, H, W) reconstructions, attached to the VAE's graph.
            posterior_mean, posterior_logvar: (B, C, h, w) posterior parameters.
            step: global optimizer step (compared with ``disc_start``).
            last_layer: the decoder's last weight (:func:`decoder_last_layer` of the unwrapped VAE);
                required when the adaptive adversarial weight is active.
            latents, decode, tau: the sampled z (B, c, h, w) that ``recon`` decodes, the VAE's decoder as a
                callable and this micro-batch's EQ-VAE τ, for the diffusability regularisers (unused without
                them; see :func:`sdvae.train.regularisers.transformed_pairs`); ``latents`` for ``alignment`` too.
            encoder_last_layer: the encoder's last weight (:func:`sdvae.train.alignment.encoder_last_layer`), for
                ``alignment_adaptive``.

        Returns:
            (0-dim fp32 loss, logs): ``loss`` total; ``rec`` unweighted per-element L1/MSE; ``lpips``
            (if enabled) mean distance; ``nll`` per-element reconstruction term incl. logvar;
            ``equivariance`` / ``scale_equivariance`` (only when their weight is > 0) R(τ) / R(½) before
            their weight; ``alignment``, ``alignment_cos``, ``alignment_distmat`` (and ``alignment_weight``), see
            :class:`~sdvae.train.alignment.VFAlignment`, only with ``alignment`` > 0; ``logvar`` (if learned);
            ``kl`` nats/image; ``kl_bpd`` bits/dim; and, with a discriminator, ``g_adv`` (−mean fake logits, 0
            before ``disc_start``) and ``d_weight`` (λ incl. ``disc_weight``, 0 before ``disc_start``).
        """
        cfg = self.cfg
        dims = images[0].numel()  # D = C·H·W: converts LDM's per-image sums into per-element means
        nll, logs = self._nll(images, recon)
        rec = logs["rec"]
        total = nll
        for name, (weight, target, decoded) in transformed_pairs(cfg, images, latents, decode, tau).items():
            logs[name] = term = self._pair_reconstruction(target, decoded)
            total = total + weight * term
        if self.alignment is not None:
            term, aligned = self.alignment(images, latents, nll, encoder_last_layer)
            logs |= aligned
            total = total + term

        kl = kl_divergence(posterior_mean, posterior_logvar) if cfg.kl_weight > 0 else None
        if kl is None:
            with torch.no_grad():
                kl_log = kl_divergence(posterior_mean, posterior_logvar)
        else:
            kl_log = kl
            total = total + (cfg.kl_weight / dims) * kl
        logs["kl"] = kl_log
        logs["kl_bpd"] = bits_per_dim(kl_log, dims)

        if self.discriminator is not None:
            g_adv = rec.new_zeros(())
            d_weight = rec.new_zeros(())
            if self.disc_active(step):
                disc = self._bare_discriminator()
                with frozen(disc):
                    logits_fake = disc(recon)
                g_adv = generator_adv_loss(logits_fake.float())
                if cfg.disc_adaptive_weight:
                    if last_layer is None:
                        raise ValueError("generator_loss: last_layer is required for the adaptive GAN weight")
                    d_weight = adaptive_weight(nll, g_adv, last_layer) * cfg.disc_weight
                else:
                    d_weight = torch.full((), float(cfg.disc_weight), device=g_adv.device)
                total = total + d_weight * g_adv
            logs["g_adv"] = g_adv
            logs["d_weight"] = d_weight
        logs = {"loss": total, **logs}
        return total, self._to_floats(logs)

    # -- diffusability regularisers -------------------------------------------------------------------

    def _pair_reconstruction(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """R: the main reconstruction term on another pair, ``recon_weight``·L1/MSE + ``lpips_weight``·LPIPS (fp32)."""
        cfg = self.cfg
        term = cfg.recon_weight * reconstruction_loss(target, recon, cfg.recon) if cfg.recon_weight > 0 else None
        if self.lpips is not None:
            lp = cfg.lpips_weight * lpips_distance(self.lpips, rgb_view(target), rgb_view(recon)).mean()
            term = lp if term is None else term + lp
        assert term is not None  # LossConfig refuses a regulariser with both weights 0
        return term.float()

    # -- discriminator step -----------------------------------------------------------------------

    def discriminator_loss(
        self, images: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the discriminator update (hinge or vanilla), on detached reconstructions.

        ``recon`` is detached here, so backpropagating this loss never reaches the VAE (its ``.grad``
        stays as the generator step left it). Real and fake batches go through the discriminator in
        separate calls, as in LDM (with BatchNorm each is normalised with its own statistics).

        Before ``disc_start`` (or without a discriminator) the discriminator is not run and the loss
        is ``0·Σ params``: ``backward()`` works and leaves zero gradients. An optimizer step on those
        is not a no-op (AdamW still counts steps and applies weight decay), so trainers should skip
        ``disc_opt.step()`` while :meth:`disc_active` is False.

        Args:
            images: (B, C, H, W) real images in [-1, 1].
            recon: (B, C, H, W) reconstructions (detached here).
            step: global optimizer step.

        Returns:
            (0-dim fp32 loss, logs): ``disc_loss``, ``logits_real``, ``logits_fake`` (mean logits;
            0 before ``disc_start``).
        """
        if not self.disc_active(step):
            params = list(self.discriminator.parameters()) if self.discriminator is not None else []
            if params:
                zero = 0.0 * sum(p.float().sum() for p in params)
            else:
                zero = torch.zeros((), device=images.device, requires_grad=True)
            return zero, {"disc_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        disc = self.discriminator  # possibly DDP-wrapped: its gradients must be all-reduced
        assert disc is not None
        logits_real = disc(images.detach()).float()
        logits_fake = disc(recon.detach()).float()
        d_loss_fn = hinge_d_loss if self.cfg.disc_loss == "hinge" else vanilla_d_loss
        loss = d_loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, self._to_floats(logs)
