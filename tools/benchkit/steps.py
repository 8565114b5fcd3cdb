"""The training-step recipes, each written once: ours and the peers it is compared with.

* ``ours``: the step ``tools/train.py`` runs, through its pieces (``VAEForward``, ``VAELoss`` with LPIPS
  *with* gradient, the PatchGAN when ``disc_weight`` > 0, ``optimizer_steps``' one-scaler-update AMP
  recipe, AdamW + schedule, EMA).
* ``ldm``: the same work written the way LDM's ``LPIPSWithDiscriminator`` does it with diffusers'
  ``AutoencoderKL`` called directly: L1/MSE + LPIPS with gradient summed per image, summed KL, and with
  a discriminator the adaptive weight from two ``autograd.grad`` calls and a hinge discriminator update
  on the same reconstruction. In fp32 it is the plain reference step (``reference``, an alias).
* ``example``: the generator step of diffusers' ``examples/research_projects/autoencoderkl/
  train_autoencoderkl.py`` as users run it: LPIPS *without* gradient, summed reconstruction and KL,
  PatchGAN forward + adaptive weight every step, one backward, clipping, AdamW. Its alternate
  discriminator iterations are not run (they add a full VAE forward each: the row flatters the example).

Each recipe returns a :class:`Recipe`; ``forward_backward`` then ``update`` is one step (split so
``bench.py gpu`` can inspect gradients between them). Every recipe clips the VAE's gradients to 1.0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .flops import count_flops
from .inputs import posterior_noise, synthetic_batches
from .memory import peak_bytes, reset_peak
from .timing import Stopwatch


@dataclass
class TrainSpec:
    """What every recipe is built from (``bench.py train`` flags; ``TrainSpec.from_args``)."""

    preset: str = "tiny"
    batch: int = 16
    resolution: int = 64
    precision: str = "no"  # accelerate's spelling: no | bf16 | fp16
    recon: str = "mse"
    lpips: float = 0.1  # LPIPS weight (0: off), random backbone: nothing is downloaded
    lpips_net: str = "vgg"
    kl_weight: float = 1e-6
    lr: float = 4e-4
    disc_weight: float = 0.0  # ours and ldm: PatchGAN weight (0: none); the example always runs its own
    disc_start: int = 0
    disc_layers: int = 3
    disc_ndf: int = 64
    channels_last: bool = False  # ours only (train.channels_last)
    device: str = ""  # "" : sdvae.device.resolve_device()

    @classmethod
    def from_args(cls, args, **override) -> TrainSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names} | override)


class Amp:
    """Autocast and (fp16) loss scaling for the peers: PyTorch's AMP recipe, one ``update()`` per step."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opts: list[torch.optim.Optimizer], clip_params, clip: float = 1.0) -> None:
        """Unscale, clip ``clip_params`` (the first optimizer's), step every optimizer, zero their grads."""
        if self.scaler:
            self.scaler.unscale_(opts[0])
        torch.nn.utils.clip_grad_norm_(list(clip_params), clip)
        for opt in opts:
            self.scaler.step(opt) if self.scaler else opt.step()
        if self.scaler:
            self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)


@dataclass
class Recipe:
    """One training step: ``forward_backward(i, images, eps) -> logs`` (with ``"loss"``), then ``update(i)``."""

    forward_backward: Callable[[int, torch.Tensor, torch.Tensor], dict]
    update: Callable[[int], None]
    device: torch.device
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    discriminator: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)
    on_stepped: Callable[[int], None] | None = None  # ours: called after the optimizer steps, before zero_grad

    def step(self, i: int, images: torch.Tensor, eps: torch.Tensor) -> dict:
        logs = self.forward_backward(i, images, eps)
        self.update(i)
        return logs


def spec_device(spec: TrainSpec) -> torch.device:
    from sdvae.device import resolve_device

    return torch.device(spec.device) if spec.device else resolve_device()


def build_lpips(spec: TrainSpec, device: torch.device, plain: bool = False) -> torch.nn.Module | None:
    """The LPIPS of every recipe (seeded random backbone), None with ``lpips`` 0. ``plain``: the default
    memory format of a user's ``lpips.LPIPS`` (``build_lpips`` itself returns a channels-last backbone)."""
    from sdvae.metrics.lpips import build_lpips as build

    if spec.lpips <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(spec.lpips_net, random_backbone=True)
    model = model.to(device).eval().requires_grad_(False)
    return model.to(memory_format=torch.contiguous_format) if plain else model


def ours(vae, spec: TrainSpec, total_steps: int) -> Recipe:
    """tools/train.py's step (see the module docstring)."""
    from sdvae.train.config import LossConfig, OptimConfig
    from sdvae.train.ema import EMA
    from sdvae.train.losses import VAELoss
    from sdvae.train.modules import decoder_last_layer
    from sdvae.train.optim import build_optimizer, optimizer_steps
    from sdvae.train.vae_forward import VAEForward

    device = spec_device(spec)
    amp = Amp(device, spec.precision)
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    vae.to(device, memory_format=fmt).train()
    cfg = LossConfig(recon=spec.recon, lpips_weight=spec.lpips, lpips_net=spec.lpips_net, kl_weight=spec.kl_weight,
                     disc_weight=spec.disc_weight, disc_start=spec.disc_start, disc_layers=spec.disc_layers)
    loss_fn = VAELoss(cfg, lpips_model=build_lpips(spec, device), disc_ndf=spec.disc_ndf).to(device)
    if spec.channels_last:
        loss_fn.to(memory_format=fmt)
    model, disc = VAEForward(vae), loss_fn.discriminator
    opt, sched = build_optimizer(vae.parameters(), spec.lr, OptimConfig(lr=spec.lr, betas=(0.9, 0.99)), total_steps)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=spec.lr, betas=(0.5, 0.9)) if disc is not None else None
    ema, params = EMA(vae, 0.999), [p for p in vae.parameters() if p.requires_grad]
    last_layer = decoder_last_layer(vae) if disc is not None else None

    def forward_backward(i: int, images: torch.Tensor, eps: torch.Tensor) -> dict:
        images = images.contiguous(memory_format=fmt)
        with amp.autocast():
            recon, mean, logvar = model(images, eps)
            loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, i, last_layer)
        amp.backward(loss)
        if disc is not None:
            with amp.autocast():
                d_loss, d_logs = loss_fn.discriminator_loss(images, recon, i)
            amp.backward(d_loss)
            logs |= d_logs
        return logs

    def update(i: int) -> None:
        disc_on = disc is not None and loss_fn.disc_active(i)
        optimizer_steps(amp.scaler, opt, params, 1.0, disc_opt if disc_on else None)
        if recipe.on_stepped is not None:
            recipe.on_stepped(i)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if disc_opt is not None:
            disc_opt.zero_grad(set_to_none=True)
        ema.update(vae)

    recipe = Recipe(forward_backward, update, device, opt, disc_opt, amp.scaler, disc, {"loss_fn": loss_fn})
    return recipe


def _adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's (and the example's) GAN weight: ‖∇nll‖ / ‖∇g_loss‖ on the decoder's last layer."""
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)).clamp(0.0, 1e4).detach()


def _recon_terms(vae, spec: TrainSpec, images, eps, lpips_model, lpips_grad: bool):
    """Encode, reparameterise with ``eps``, decode: (recon, per-image summed NLL, summed KL per image)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.mean + posterior.std * eps).sample
    rec = (F.mse_loss if spec.recon == "mse" else F.l1_loss)(recon.float(), images.float(), reduction="none")
    if lpips_model is not None:
        with torch.set_grad_enabled(lpips_grad and torch.is_grad_enabled()):
            perceptual = lpips_model(recon, images)
        rec = rec + spec.lpips * perceptual
    return recon, rec.sum() / rec.shape[0], posterior.kl().sum() / images.shape[0]


def _peer(vae, spec: TrainSpec, with_disc: bool):
    """What both peers start from: device, AMP, the VAE on it, plain LPIPS, a PatchGAN when asked."""
    from sdvae.train.discriminator import NLayerDiscriminator

    device = spec_device(spec)
    vae.to(device).train()
    disc = NLayerDiscriminator(3, spec.disc_ndf, spec.disc_layers, "batch").to(device) if with_disc else None
    return device, Amp(device, spec.precision), build_lpips(spec, device, plain=True), disc


def ldm(vae, spec: TrainSpec, total_steps: int) -> Recipe:
    """LDM's loss and updates, the same work as ours (see the module docstring)."""
    device, amp, lpips_model, disc = _peer(vae, spec, spec.disc_weight > 0)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, betas=(0.5, 0.9), weight_decay=0.0)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=spec.lr, betas=(0.5, 0.9)) if disc is not None else None
    last_layer = vae.decoder.conv_out.weight
    state = {"disc_on": False}

    def forward_backward(i: int, images: torch.Tensor, eps: torch.Tensor) -> dict:
        state["disc_on"] = disc_on = disc is not None and i >= spec.disc_start
        with amp.autocast():
            recon, nll, kl = _recon_terms(vae, spec, images, eps, lpips_model, lpips_grad=True)
            loss = nll + spec.kl_weight * kl
            if disc_on:
                g_loss = -disc(recon).mean()
                loss = loss + spec.disc_weight * _adaptive_weight(nll, g_loss, last_layer) * g_loss
        amp.backward(loss)
        if disc_on:
            with amp.autocast():
                fake = recon.detach()
                d_loss = 0.5 * (F.relu(1 - disc(images)).mean() + F.relu(1 + disc(fake)).mean())
            amp.backward(d_loss)
        return {"loss": float(loss.detach()) / images[0].numel()}  # per element, comparable with the other rows

    def update(i: int) -> None:
        amp.step([opt, disc_opt] if state["disc_on"] else [opt], vae.parameters())
        if disc_opt is not None:
            disc_opt.zero_grad(set_to_none=True)

    return Recipe(forward_backward, update, device, opt, disc_opt, amp.scaler, disc)


def example(vae, spec: TrainSpec, total_steps: int) -> Recipe:
    """diffusers' train_autoencoderkl.py generator step (see the module docstring)."""
    device, amp, lpips_model, disc = _peer(vae, spec, True)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, betas=(0.9, 0.99), weight_decay=0.0)
    last_layer = vae.decoder.conv_out.weight

    def forward_backward(i: int, images: torch.Tensor, eps: torch.Tensor) -> dict:
        with amp.autocast():
            recon, nll, kl = _recon_terms(vae, spec, images, eps, lpips_model, lpips_grad=False)
            g_loss = -disc(recon).mean()
            loss = nll + spec.kl_weight * kl + 0.5 * _adaptive_weight(nll, g_loss, last_layer) * g_loss
        amp.backward(loss)
        return {"loss": float(loss.detach()) / images[0].numel()}

    return Recipe(forward_backward, lambda i: amp.step([opt], vae.parameters()), device, opt, None, amp.scaler,
                  disc)


RECIPES: dict[str, Callable[..., Recipe]] = {"ours": ours, "ldm": ldm, "example": example}


def build_recipe(mode: str, vae, spec: TrainSpec, total_steps: int) -> Recipe:
    """``mode`` from :data:`RECIPES`, or ``reference``: the ldm step in fp32."""
    if mode == "reference":
        mode, spec = "ldm", dataclasses.replace(spec, precision="no")
    return RECIPES[mode](vae, spec, total_steps)


def timed_steps(recipe: Recipe, spec: TrainSpec, latent_shape: tuple[int, int, int], steps: int, warmup: int,
                batches: list[torch.Tensor] | None = None, count: bool = True) -> dict:
    """``warmup`` untimed then ``steps`` timed steps on seeded synthetic batches (or ``batches``, cycled):
    images/s, peak memory, losses, and (``count``) the FLOPs of one more step, counted after the timing."""
    total = warmup + steps
    batches = batches or synthetic_batches(total, spec.batch, spec.resolution)
    noise = posterior_noise(total + 1, spec.batch, latent_shape)
    watch, losses = Stopwatch(recipe.device), []
    reset_peak(recipe.device)
    for i in range(total):
        images, eps = batches[i % len(batches)].to(recipe.device), noise[i].to(recipe.device)
        with watch.lap(counted=i >= warmup):
            losses.append(recipe.step(i, images, eps)["loss"])
    peak = peak_bytes(recipe.device)
    flops = None
    if count:
        images, eps = batches[0].to(recipe.device), noise[total].to(recipe.device)
        flops = count_flops(lambda: recipe.step(total, images, eps))[1]
    tail = losses[-5:]
    return {"images_per_s": steps * spec.batch / watch.total, "seconds_per_step": watch.total / steps,
            "peak_memory": peak, "flops_per_step": flops, "first_loss": losses[0],
            "last_loss": sum(tail) / len(tail), "device": str(recipe.device)}
