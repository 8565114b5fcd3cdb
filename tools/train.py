#!/usr/bin/env python
"""Train or fine-tune an AutoencoderKL.

    accelerate launch tools/train.py configs/NAME.yaml [--section.key=value ...]
    python tools/train.py configs/test.yaml --train.steps=20          # single process
    torchrun --nproc_per_node 2 tools/train.py configs/test.yaml      # CPU (gloo) works too

One ``main(cfg)`` read top to bottom. Loss math is in ``sdvae.train.losses``, data in ``sdvae.train.datasets``,
checkpoints in ``sdvae.train.checkpoint``. Properties this script keeps (each is tested):
the forward pass goes through the module ``accelerator.prepare`` returned (DDP + autocast), the
trainable weights stay fp32 under mixed precision, the VAE and the discriminator both update on every
optimizer step once the discriminator starts, the discriminator step never touches the VAE's
gradients, and kill-and-resume is bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm import tqdm

from sdvae.atomic import atomic_file
from sdvae.errors import UserError
from sdvae.model.info import downsample_factor
from sdvae.model.load import load_vae
from sdvae.model.save import save_diffusers
from sdvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sdvae.train.config import RunConfig, dump_config, load_config
from sdvae.train.ema import EMA
from sdvae.train.forward import VAEForward, posterior_noise
from sdvae.train.loaders import build_dataloaders
from sdvae.train.losses import VAELoss
from sdvae.train.optim import build_optimizer
from sdvae.train.validation import reconstruction_metrics, save_comparison_grid


def main(cfg: RunConfig) -> dict[str, float]:
    """Run (or resume) training as configured; returns the last validation metrics."""
    out = Path(cfg.train.out)
    accelerator = Accelerator(
        # Without a GPU, accelerate only sets up multi-process (gloo) training when told it is on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        # Frozen encoder (decoder-only fine-tuning) leaves parameters without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not cfg.model.train_encoder)],
    )
    main_proc, device = accelerator.is_main_process, accelerator.device
    torch.manual_seed(cfg.train.seed)  # same initial weights (discriminator, learned logvar) on every rank

    # --- model, losses, optimizers -------------------------------------------------------------
    vae = load_vae(cfg.model.init, norm_num_groups=cfg.model.norm_num_groups).train()
    vae.requires_grad_(True)
    if not cfg.model.train_encoder:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    factor = downsample_factor(vae)
    if cfg.data.resolution % factor:
        raise UserError(f"data.resolution={cfg.data.resolution} is not a multiple of the downsampling factor {factor}")
    latent_shape = (vae.config.latent_channels, cfg.data.resolution // factor, cfg.data.resolution // factor)
    loss_fn = VAELoss(cfg.loss).to(device)
    use_disc = cfg.loss.disc_weight > 0

    opt, sched = build_optimizer([*vae.parameters(), *loss_fn.trainable_parameters()], cfg.optim.lr,
                                 cfg.optim, cfg.train.steps)
    disc_opt = disc_sched = None
    if use_disc:
        disc_opt, disc_sched = build_optimizer(loss_fn.discriminator.parameters(), cfg.optim.disc_lr or cfg.optim.lr,
                                               cfg.optim, cfg.train.steps)

    model = accelerator.prepare(VAEForward(vae))
    opt = accelerator.prepare(opt)
    if use_disc:
        loss_fn.discriminator, disc_opt = accelerator.prepare(loss_fn.discriminator, disc_opt)
    ema = EMA(vae, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    eval_vae = copy.deepcopy(vae).eval().requires_grad_(False)  # holds EMA (or current) weights for validation

    # --- resume ----------------------------------------------------------------------------------
    modules = {"vae": vae, "loss": loss_fn.state_module()}
    optimizers = {"vae": opt.optimizer} | ({"disc": disc_opt.optimizer} if use_disc else {})
    schedulers = {"vae": sched} | ({"disc": disc_sched} if use_disc else {})
    start_step, run_meta = 0, {"skipped": 0, "seconds": 0.0}
    resume_from = latest_checkpoint(out)
    if resume_from is not None:
        start_step, extra, run_meta = load_checkpoint(resume_from, modules=modules, optimizers=optimizers,
                                                      schedulers=schedulers, rank=accelerator.process_index)
        if ema is not None:
            ema.load_state_dict(extra["ema"])
    accelerator.wait_for_everyone()

    # --- data ------------------------------------------------------------------------------------
    ga = cfg.train.grad_accum
    train_loader, val_loader, data_info = build_dataloaders(
        cfg.data, cfg.train.batch_size, cfg.train.seed, accelerator.process_index, accelerator.num_processes,
        start_step=start_step * ga, skip_log_path=out / f"skipped-rank{accelerator.process_index}.txt")
    batches = iter(train_loader)

    writer = None
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "config.yaml") as tmp:
            tmp.write_text(dump_config(cfg))
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        accelerator.print(f"data: {data_info}; resuming from {resume_from}" if resume_from else f"data: {data_info}")

    def validate(step: int) -> dict[str, float]:
        """EMA weights on the held-out images: PSNR/SSIM scalars and an original|reconstruction grid."""
        (ema.copy_to(eval_vae) if ema is not None else eval_vae.load_state_dict(vae.state_dict()))
        metrics, pairs = reconstruction_metrics(eval_vae, val_loader, device)
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, step)
            grid = save_comparison_grid(pairs, out / "samples" / f"step-{step:08d}.png")
            writer.add_image("val/original|reconstruction", grid, step)
        return metrics

    def checkpoint(step: int) -> None:
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        save_checkpoint(out, step, modules=modules, optimizers=optimizers, schedulers=schedulers,
                        extra_tensors=extra, meta=run_meta, rank=accelerator.process_index, is_main=main_proc,
                        barrier=accelerator.wait_for_everyone, keep=cfg.train.keep_checkpoints)

    # --- train -----------------------------------------------------------------------------------
    last_layer = vae.decoder.conv_out.weight  # for the adaptive GAN weight (LDM)
    trainable = [p for p in [*vae.parameters(), *loss_fn.trainable_parameters()] if p.requires_grad]
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not main_proc, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    tick, images_seen = time.perf_counter(), 0
    for step in range(start_step, cfg.train.steps):
        logs: dict[str, float] = {}
        for micro in range(ga):
            batch = next(batches)
            run_meta["skipped"] += int(batch["skipped"])
            images = batch["pixels"].to(device)
            eps = posterior_noise(batch["index"], step * ga + micro, latent_shape, cfg.train.seed).to(device)
            # Gradients are all-reduced only on the last micro-batch of an accumulation.
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    recon, mean, logvar = model(images, eps)
                    g_loss, g_logs = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer)
                accelerator.backward(g_loss / ga)
            if use_disc:
                with accelerator.no_sync(loss_fn.discriminator) if micro < ga - 1 else contextlib.nullcontext():
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step)
                    accelerator.backward(d_loss / ga)
                g_logs |= d_logs
            for k, v in g_logs.items():
                logs[k] = logs.get(k, 0.0) + v / ga
            images_seen += images.shape[0] * accelerator.num_processes
        loss_fn.all_reduce_trainable_grads()  # the learned logvar lives outside every DDP module
        if cfg.optim.grad_clip > 0:
            logs["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if use_disc:  # every step once started, alongside the VAE (not alternating)
            if loss_fn.disc_active(step):  # before that Adam would count empty steps
                disc_opt.step()
                disc_sched.step()
            disc_opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(vae)
        done = step + 1
        if not all(math.isfinite(v) for v in logs.values()):
            raise RuntimeError(f"non-finite loss at step {done}: {logs}")

        if main_proc and (done % cfg.log.every == 0 or done == cfg.train.steps):
            elapsed = time.perf_counter() - tick
            rate = images_seen / max(elapsed, 1e-9)
            run_meta["seconds"] += elapsed
            tick, images_seen = time.perf_counter(), 0
            bar.set_postfix(loss=f"{logs.get('loss', 0.0):.4f}", img_s=f"{rate:.1f}")
            if writer is not None:
                for k, v in logs.items():
                    writer.add_scalar(f"train/{k}", v, done)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], done)
                writer.add_scalar("train/images_per_s", rate, done)
        bar.update(1)
        if main_proc and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
            metrics = validate(done)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            checkpoint(done)
    bar.close()
    # DDP keeps replicas identical only if every gradient went through it: check, don't assume.
    checksum = torch.stack([p.detach().double().sum() for p in trainable]).sum().view(1).to(device)
    checksums = accelerator.gather(checksum).cpu()
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"parameters differ across processes: checksums {checksums.tolist()}")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} process(es): "
                      f"checksum {float(checksum):.10e}")

    # --- export ----------------------------------------------------------------------------------
    if main_proc:
        if not metrics:
            metrics = validate(cfg.train.steps)
        (ema.copy_to(eval_vae) if ema is not None else eval_vae.load_state_dict(vae.state_dict()))
        save_diffusers(eval_vae, out / "final", overwrite=True)
        summary = {**metrics, "steps": cfg.train.steps, "skipped_images": run_meta["skipped"],
                   "train_seconds": round(run_meta["seconds"], 1), "weights": "ema" if ema is not None else "raw"}
        with atomic_file(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: tools/train.py CONFIG.yaml [--section.key=value ...]")
    try:
        main(load_config(sys.argv[1], sys.argv[2:]))
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
