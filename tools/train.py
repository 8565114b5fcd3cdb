#!/usr/bin/env python
"""Train or fine-tune an AutoencoderKL.

    accelerate launch tools/train.py configs/NAME.yaml [--section.key=value ...]
    python tools/train.py configs/test.yaml --train.steps=20          # single process
    torchrun --nproc_per_node 2 tools/train.py configs/test.yaml      # CPU (gloo) works too
    python tools/train.py --help                                       # every key: type, default, meaning
    python tools/train.py configs/NAME.yaml --print-config             # the resolved config, then exit

One ``main(cfg)`` read top to bottom. Loss math is in ``sdvae.train.losses``, data in ``sdvae.train.datasets``,
checkpoints in ``sdvae.train.checkpoint``, launcher resolution in ``sdvae.train.launch``. Properties this
script keeps (each is tested): the forward pass goes through the module ``accelerator.prepare`` returned
(DDP + autocast), the trainable weights stay fp32 under mixed precision, the VAE and the discriminator
both update on every optimizer step once the discriminator starts, the discriminator step never touches
the VAE's gradients, fp16 loss scaling has one unscale/step per optimizer and one update per iteration,
N processes match 1 process on the same global batch, and kill-and-resume is bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sdvae.atomic import atomic_file, write_json
from sdvae.errors import UserError
from sdvae.heap import keep_freed_memory
from sdvae.images.channels import model_channels
from sdvae.model.family import is_flux2
from sdvae.model.info import downsample_factor, scaled_factor
from sdvae.model.load import load_vae
from sdvae.model.save import save_diffusers
from sdvae.seeding import seed_global_rngs
from sdvae.train.alignment import encoder_last_layer
from sdvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sdvae.train.config import RunConfig, config_help, config_to_dict, dump_config, load_config
from sdvae.train.ema import EMA
from sdvae.train.launch import log_image, make_accelerator, resolve_config, start_trackers
from sdvae.train.loaders import build_dataloaders, latent_stats_loader
from sdvae.train.losses import VAELoss
from sdvae.train.modules import decoder_last_layer
from sdvae.train.optim import build_optimizer, effective_lr, optimizer_steps, restore_buffers, snapshot_buffers
from sdvae.train.regularisers import draw_transform
from sdvae.train.runfolder import move_checkpoints_aside, resume_point
from sdvae.train.vae_forward import (
    VAEForward,
    compile_forward,
    latent_decoder,
    posterior_noise,
    prepare_vae,
    reparameterize,
)
from sdvae.train.validation import (
    measure_latent_stats,
    reconstruction_metrics,
    save_comparison_grid,
    write_measured_scaling,
)


def main(cfg: RunConfig) -> dict[str, float]:
    """Run (or resume) training as configured; returns the last validation metrics."""
    keep_freed_memory()  # CPU steps reuse freed activations instead of faulting in new pages (sdvae/heap.py)
    out = Path(cfg.train.out)
    accelerator = make_accelerator(cfg)  # precision/accumulation/processes: the YAML's if set, else the launcher's
    cfg = resolve_config(cfg, accelerator)
    main_proc, device = accelerator.is_main_process, accelerator.device
    ga, procs = cfg.train.grad_accum, accelerator.num_processes
    lr = effective_lr(cfg.optim.lr, cfg.optim, cfg.train.batch_size, procs, ga)
    disc_lr = effective_lr(cfg.optim.disc_lr or cfg.optim.lr, cfg.optim, cfg.train.batch_size, procs, ga)
    accelerator.print(f"mixed_precision {cfg.train.mixed_precision}, grad_accum {ga}, processes {procs}, "
                      f"global batch {cfg.train.batch_size * procs * ga}, lr {lr:.3e}"
                      + (f" (scale_lr: {cfg.optim.lr:.3e} x {cfg.train.batch_size} x {procs} x {ga})"
                         if cfg.optim.scale_lr else ""))
    # Refuse a rerun that would change this folder's trajectory (read-only, on every rank), then act.
    resume_from, move_aside = resume_point(out, config_to_dict(cfg), cfg.train.resume)
    accelerator.wait_for_everyone()
    if main_proc and move_aside:
        accelerator.print(f"train.resume=never: previous checkpoints moved to {move_checkpoints_aside(out)}")
    # Same initial weights (discriminator, learned logvar) on every rank; Python's and numpy's streams seeded
    # too, so an interrupted run's checkpoints hold the RNG states of an uninterrupted one.
    seed_global_rngs(cfg.train.seed)

    # --- model, losses, optimizers -------------------------------------------------------------
    vae = load_vae(cfg.model.init, norm_num_groups=cfg.model.norm_num_groups,
                   layers_per_block=cfg.model.layers_per_block, image_channels=cfg.model.image_channels)
    channels = model_channels(vae.config)  # images are read as 1 grayscale, 3 RGB or 4 RGBA channels
    checkpointed = prepare_vae(vae, cfg.model, channels_last=cfg.train.channels_last)  # trainable parts etc.
    accelerator.print(f"gradient checkpointing: {checkpointed} blocks" if checkpointed else
                      "gradient checkpointing: off")
    factor = downsample_factor(vae)
    if cfg.data.resolution % scaled_factor(vae):  # FLUX.2: 16, for its 2x2-patchified latent statistics
        raise UserError(f"data.resolution={cfg.data.resolution} is not a multiple of the downsampling factor "
                        f"{scaled_factor(vae)}")
    latent_shape = (vae.config.latent_channels, cfg.data.resolution // factor, cfg.data.resolution // factor)
    # (its LPIPS backbone is channels-last already; loss.alignment: VA-VAE's backbone and trained projection)
    loss_fn = VAELoss(cfg.loss, image_channels=channels, latent_channels=latent_shape[0]).to(device)
    if cfg.train.channels_last:  # the discriminator takes the memory format of the reconstructions
        loss_fn.to(memory_format=torch.channels_last)
    use_disc = cfg.loss.disc_weight > 0

    opt, sched = build_optimizer([*vae.parameters(), *loss_fn.trainable_parameters()], lr, cfg.optim,
                                 cfg.train.steps)
    disc_opt = disc_sched = None
    if use_disc:
        disc_opt, disc_sched = build_optimizer(loss_fn.discriminator.parameters(), disc_lr, cfg.optim,
                                               cfg.train.steps)

    # Modules only: the optimizers stay plain (loss scaling: sdvae.train.optim.optimizer_steps).
    model = compile_forward(accelerator.prepare(VAEForward(vae)), cfg.train.compile)
    if use_disc:
        loss_fn.discriminator = accelerator.prepare(loss_fn.discriminator)
    ema = EMA(vae, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    eval_vae = copy.deepcopy(vae).eval().requires_grad_(False)  # holds EMA (or current) weights for validation

    # --- resume ----------------------------------------------------------------------------------
    modules = {"vae": vae, "loss": loss_fn.state_module()}
    optimizers = {"vae": opt} | ({"disc": disc_opt} if use_disc else {})
    schedulers = {"vae": sched} | ({"disc": disc_sched} if use_disc else {})
    # skipped: unreadable images; skipped_steps / bad_streak: non-finite steps in all / in a row so far.
    start_step, run_meta = 0, {"skipped": 0, "seconds": 0.0}
    if resume_from is not None:
        start_step, extra, run_meta = load_checkpoint(resume_from, modules=modules, optimizers=optimizers,
                                                      schedulers=schedulers, rank=accelerator.process_index)
        if ema is not None:
            ema.load_state_dict(extra["ema"])
        if accelerator.scaler is not None and run_meta.get("scaler"):  # fp16: the loss scale and its growth count
            accelerator.scaler.load_state_dict(run_meta["scaler"])
    run_meta = {"skipped_steps": 0, "bad_streak": 0} | run_meta
    accelerator.wait_for_everyone()

    # --- data ------------------------------------------------------------------------------------
    train_loader, val_loader, data_info = build_dataloaders(
        cfg.data, cfg.train.batch_size, cfg.train.seed, accelerator.process_index, procs,
        start_step=start_step * ga, skip_log_path=out / f"skipped-rank{accelerator.process_index}.txt",
        channels=channels)
    batches = iter(train_loader)

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "config.yaml") as tmp:
            tmp.write_text(dump_config(cfg))  # the resolved config (launcher-decided keys filled in)
        accelerator.print(f"data: {data_info}; resuming from {resume_from}" if resume_from else f"data: {data_info}")
    start_trackers(accelerator, cfg)

    def validate(step: int) -> dict[str, float]:
        """EMA weights on the held-out images: PSNR/SSIM scalars and samples/step-N.png (original|reconstruction)."""
        (ema.copy_to(eval_vae) if ema is not None else eval_vae.load_state_dict(vae.state_dict()))
        metrics, pairs = reconstruction_metrics(eval_vae, val_loader, device)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        if pairs:
            grid = save_comparison_grid(pairs, out / "samples" / f"step-{step:08d}.png")
            log_image(accelerator, "val/original|reconstruction", grid, step)
        return metrics

    def checkpoint(step: int) -> None:
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        if accelerator.scaler is not None:
            run_meta["scaler"] = accelerator.scaler.state_dict()
        save_checkpoint(out, step, modules=modules, optimizers=optimizers, schedulers=schedulers,
                        extra_tensors=extra, meta=run_meta, rank=accelerator.process_index, is_main=main_proc,
                        barrier=accelerator.wait_for_everyone, keep=cfg.train.keep_checkpoints)

    # --- train -----------------------------------------------------------------------------------
    last_layer = decoder_last_layer(vae)  # for the adaptive GAN weight (LDM)
    enc_layer = encoder_last_layer(vae) if cfg.loss.alignment_adaptive else None  # VA-VAE's adaptive VF weight
    decode = latent_decoder(model)  # the diffusability regularisers decode transformed latents
    trainable = [p for p in [*vae.parameters(), *loss_fn.trainable_parameters()] if p.requires_grad]
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not main_proc, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    tick, images_seen = time.perf_counter(), 0

    def all_ranks(ok: bool) -> bool:
        """True when every process's flag is (a step is skipped everywhere or nowhere)."""
        if procs == 1:
            return ok
        return float(accelerator.reduce(torch.tensor([float(not ok)], device=device), "sum")) == 0

    for step in range(start_step, cfg.train.steps):
        logs: dict[str, float] = {}
        disc_buffers = snapshot_buffers(loss_fn.discriminator) if use_disc else []  # BatchNorm statistics
        for micro in range(ga):
            batch = next(batches)
            run_meta["skipped"] += int(batch["skipped"])
            images = batch["pixels"].to(device, memory_format=memory_format)
            eps = posterior_noise(batch["index"], step * ga + micro, latent_shape, cfg.train.seed).to(device)
            tau = draw_transform(cfg.loss, cfg.train.seed, step * ga + micro)  # EQ-VAE's τ; None when off
            # Gradients are all-reduced only on the last micro-batch of an accumulation.
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    recon, mean, logvar = model(images, eps)
                    g_loss, g_logs = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer,
                                                            latents=reparameterize(mean, logvar, eps),
                                                            decode=decode, tau=tau, encoder_last_layer=enc_layer)
                accelerator.backward(g_loss / ga)  # fp16: scaled by accelerate's GradScaler
            if use_disc:
                with accelerator.no_sync(loss_fn.discriminator) if micro < ga - 1 else contextlib.nullcontext():
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step)
                    accelerator.backward(d_loss / ga)  # the same scaler: one loss scale per iteration
                g_logs |= d_logs
            for k, v in g_logs.items():
                logs[k] = logs.get(k, 0.0) + v / ga
            images_seen += images.shape[0] * procs
        loss_fn.all_reduce_trainable_grads()  # the learned logvar lives outside every DDP module
        disc_steps = use_disc and loss_fn.disc_active(step)  # before disc_start Adam would count empty steps
        # One unscale_/step per optimizer, one scaler update per iteration; only the VAE's grads are clipped.
        # A non-finite loss or gradient on any process skips both optimizers' steps on every process.
        result = optimizer_steps(accelerator.scaler, opt, trainable, cfg.optim.grad_clip,
                                 disc_opt if disc_steps else None,
                                 loss_finite=all(math.isfinite(v) for v in logs.values()), agree=all_ranks)
        sched.step()  # the schedule follows the step count, taken or skipped
        opt.zero_grad(set_to_none=True)
        if use_disc:  # every step once started, alongside the VAE (not alternating)
            if disc_steps:
                disc_sched.step()
            disc_opt.zero_grad(set_to_none=True)
        done = step + 1
        if result.skipped:
            if use_disc:
                restore_buffers(loss_fn.discriminator, disc_buffers)
            run_meta["skipped_steps"] += 1
            run_meta["bad_streak"] += 1
            bar.write(f"step {done}: non-finite loss or gradient, optimizer step skipped "
                      f"({run_meta['bad_streak']} in a row, {run_meta['skipped_steps']} in all)")
            if 0 < cfg.train.max_bad_steps <= run_meta["bad_streak"]:
                last = latest_checkpoint(out)
                bar.close()  # the error on a line of its own
                raise UserError(f"{run_meta['bad_streak']} consecutive non-finite steps (train.max_bad_steps="
                                f"{cfg.train.max_bad_steps}) at step {done}; stopped, last checkpoint: {last}")
        else:
            run_meta["bad_streak"] = 0
            if ema is not None:
                ema.update(vae)
        logs["grad_norm"] = result.grad_norm

        if main_proc and (done % cfg.log.every == 0 or done == cfg.train.steps):
            elapsed = time.perf_counter() - tick
            rate = images_seen / max(elapsed, 1e-9)
            run_meta["seconds"] += elapsed
            tick, images_seen = time.perf_counter(), 0
            bar.set_postfix(loss=f"{logs.get('loss', 0.0):.4f}", img_s=f"{rate:.1f}")
            scale = {"train/loss_scale": accelerator.scaler.get_scale()} if accelerator.scaler is not None else {}
            accelerator.log({**{f"train/{k}": v for k, v in logs.items()}, "train/lr": sched.get_last_lr()[0],
                             "train/images_per_s": rate, "train/skipped_steps": run_meta["skipped_steps"],
                             **scale}, step=done)
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
    accelerator.print(f"parameters identical on all {procs} process(es): checksum {float(checksum):.10e}")

    # --- export ----------------------------------------------------------------------------------
    if main_proc:
        if not metrics:
            metrics = validate(cfg.train.steps)
        (ema.copy_to(eval_vae) if ema is not None else eval_vae.load_state_dict(vae.state_dict()))
        eval_vae.to(memory_format=torch.contiguous_format)
        save_diffusers(eval_vae, out / "final", overwrite=True)
        summary = {**metrics, "steps": cfg.train.steps, "skipped_images": run_meta["skipped"],
                   "skipped_steps": run_meta["skipped_steps"],
                   "train_seconds": round(run_meta["seconds"], 1), "weights": "ema" if ema is not None else "raw"}
        if cfg.model.train_encoder:  # the final encoder's latents: measured scaling_factor (latent-stats' math)
            stats = measure_latent_stats(eval_vae, latent_stats_loader(cfg.data, cfg.train.batch_size,
                                                                       cfg.train.seed, channels=channels), device)
            written = write_measured_scaling(out / "final", stats)
            summary["latent_stats"] = {**stats.to_dict(), "written": written}
            accelerator.print(f"final/: measured on {stats.rows} images' latents: " + ", ".join(
                f"{k} {v:.6g}" if isinstance(v, float) else f"{k} ({len(v)} patchified channels, into the weights)"
                for k, v in written.items() if v is not None))
        else:
            kept = ("BatchNorm statistics" if is_flux2(vae.config) else
                    f"scaling_factor {vae.config.get('scaling_factor')}")
            accelerator.print(f"final/: encoder frozen, {kept} kept from model.init")
        write_json(out / "metrics.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(config_help(), end="")
        sys.exit(0)
    if not args or args[0].startswith("-"):
        sys.exit("usage: tools/train.py CONFIG.yaml [--section.key=value ...] [--print-config] (--help: all keys)")
    try:
        config = load_config(args[0], [a for a in args[1:] if a != "--print-config"])
        if "--print-config" in args:
            print(dump_config(resolve_config(config, make_accelerator(config))), end="")
            sys.exit(0)
        main(config)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
