"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, as used by LDM / taming-transformers).

Our own implementation of the same architecture, so that no taming-transformers dependency is needed
and the layer layout (and therefore the initialisation and receptive field) matches the published
SD/LDM VAE recipe:

    Conv4x4/s2(3→ndf) · LeakyReLU(0.2)
    n_layers-1 × [Conv4x4/s2(→min(2^n,8)·ndf) · Norm · LeakyReLU(0.2)]
    Conv4x4/s1(→min(2^n_layers,8)·ndf) · Norm · LeakyReLU(0.2)
    Conv4x4/s1(→1)                                       → one logit per overlapping patch

With ``n_layers=3`` each logit sees a 70×70 pixel patch and a 256×256 image gives 30×30 logits.

Normalisation under DDP: LDM uses plain ``BatchNorm2d`` (the default here), and in a multi-process run
each LDM process normalised with its own per-GPU batch statistics. Here ``norm="batch"`` is
:class:`SyncBatchNorm2d`: under ``torch.distributed`` (any backend, gloo on CPU too) the batch statistics
are those of the *global* batch, so N processes compute exactly what 1 process computes on the same
global batch (LDM's 1-GPU behaviour at any process count); without ``torch.distributed`` it is plain
``BatchNorm2d``. Real and fake batches are still normalised separately (separate calls, as in LDM).
``norm="group"`` (batch-statistics-free, identical in any process layout) and ``norm="none"`` are
offered for runs with tiny per-process batches or when batch statistics are unwanted.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "none"]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are over the batch of all processes.

    Per-channel sums and sums of squares (fp32) are all-reduced with autograd
    (``torch.distributed.nn.functional.all_reduce``), so the backward pass is that of a batch norm
    over the global batch. Works with every backend (``nn.SyncBatchNorm`` needs CUDA). Every process
    must call ``forward`` the same number of times (true in training: same steps on every rank).
    Without ``torch.distributed`` (or in eval mode) it is exactly ``nn.BatchNorm2d``. Same state-dict
    keys as ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[: x.shape[1]] / n
        var = (stats[x.shape[1]: 2 * x.shape[1]] / n - mean.square()).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return SyncBatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """pix2pix / LDM PatchGAN discriminator.

    Args:
        in_channels: channels of the judged images (3 for RGB).
        ndf: width of the first layer (64 in LDM); later layers use up to ``8·ndf``.
        n_layers: number of stride-2 downsampling convolutions (3 in LDM: 70×70 patches).
        norm: ``"batch"`` (LDM), ``"group"`` or ``"none"``; see the module docstring about DDP.

    Shapes:
        input ``(B, in_channels, H, W)`` in [-1, 1] → logits ``(B, 1, H', W')`` (unbounded), with
        ``H' = H / 2**n_layers - 2`` for ``H`` divisible by ``2**n_layers`` (e.g. 256 → 30 for 3 layers).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")
        # A convolution followed by a normalisation with a learned shift does not need a bias
        # (pix2pix/LDM: bias only when the norm layer has no affine shift, i.e. never for BatchNorm).
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution (pix2pix)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LDM/pix2pix init: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), shifts 0.

        Conv biases keep PyTorch's default init, as in LDM's ``weights_init`` (which only touches
        ``.weight`` of convolutions).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits for ``images`` ``(B, C, H, W)`` → ``(B, 1, H', W')``."""
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5·(mean relu(1 − real) + mean relu(1 + fake))`` (LDM), a scalar."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE discriminator loss ``0.5·(mean softplus(−real) + mean softplus(fake))`` (LDM)."""
    return 0.5 * (nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss ``−mean(logits_fake)`` (LDM uses it for both hinge and vanilla D)."""
    return -logits_fake.mean()
