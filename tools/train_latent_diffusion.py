"""Train a small latent diffusion model on an ``sdvae encode-dataset`` output, then sample and decode.

    python tools/train_latent_diffusion.py LATENTS OUT [--preset small|test] [--steps N] [--batch-size B]
    accelerate launch tools/train_latent_diffusion.py LATENTS OUT ...      # several processes

One ``main``, top to bottom: a diffusers ``UNet2DModel`` learns to predict the noise of
``DDPMScheduler`` (cosine schedule, 1000 steps) on the *scaled* latents of a ``LatentDataset``
(posterior draws z = mean + σ·ε, new each epoch), in batches of one latent shape from
``BucketBatchSampler`` (sharded over processes by rank). ``--held-out`` rows never train; their
denoising loss (fixed noise and timesteps) is measured at step 0 and at every checkpoint.
A checkpoint (``OUT/checkpoints/step-N/``: the UNet, AdamW state and RNG states in safetensors, the step
and the loss log in ``state.json``; no pickle; only the newest kept) is written every ``--save-every`` steps:
run the same command again (a larger ``--steps`` to go further) to resume exactly where it stopped. A
``checkpoint.pt`` of earlier versions (a pickle) is ignored, not loaded.
At the end: ``loss.png`` (training loss and held-out loss against steps), ``samples.png`` (the VAE's
decoding of generated latents, unscaled with the dataset's recorded factors), and ``report.json``
(held-out loss at step 0 and at the end, per-channel mean/std of ``--num-stats`` generated latents,
unscaled, as ``sdvae latent-stats`` reports the dataset's).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sdvae.atomic import write_json
from sdvae.device import cuda_available
from sdvae.latents.bucket_sampler import BucketBatchSampler
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.scaling import unscale_latents
from sdvae.seeding import seeded_generator
from sdvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

PRESETS = {  # UNet2DModel widths and blocks: "test" runs in seconds; "small" (0.7M parameters) suits 8x8 latents
    "test": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "small": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("latents", help="an sdvae encode-dataset output folder")
    p.add_argument("out", help="run folder (checkpoint, loss curve, samples, report)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--held-out", type=int, default=500, help="rows kept out of training for the held-out loss")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--num-samples", type=int, default=64, help="latents decoded into samples.png")
    p.add_argument("--num-stats", type=int, default=1000, help="generated latents measured for report.json")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ancestral DDPM (default) or deterministic DDIM, on the trained schedule")
    p.add_argument("--sample-steps", type=int, default=100, help="sampling steps (spaced over the 1000)")
    p.add_argument("--vae", default=None, help="VAE to decode with (default: the dataset's recorded model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0, help="stop training (with a checkpoint) after this")
    return p.parse_args(argv)


def _plot_losses(log: dict, held: int, out: Path) -> torch.Tensor:
    """``loss.png``: the training loss (per step and smoothed) and the held-out loss; returns the training log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    tr = torch.tensor(log["train"])
    if len(tr):
        k = max(1, len(tr) // 100)  # a running mean over ~1% of the run
        smooth = torch.nn.functional.avg_pool1d(tr[None, None, :, 1], k, stride=1)[0, 0]
        ax.plot(tr[:, 0], tr[:, 1], color="0.8", lw=0.5, label="train (per step)")
        ax.plot(tr[k - 1:, 0], smooth, color="C0", label=f"train (mean of {k})")
    ho = torch.tensor(log["held_out"])
    ax.plot(ho[:, 0], ho[:, 1], "o-", color="C1", ms=3, label=f"held-out ({held} latents)")
    ax.set(xlabel="step", ylabel="noise-prediction MSE", yscale="log", title="latent diffusion on sdvae latents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    return tr


def _sample(args: argparse.Namespace, unet: torch.nn.Module, scheduler: Any, shape: tuple[int, int, int],
            data: LatentDataset, device: torch.device, out: Path) -> torch.Tensor:
    """Generate latents on the trained schedule, decode the first ``--num-samples`` into ``samples.png``;
    returns the generated latents, unscaled (the VAE's space)."""
    # DDPM ancestral or DDIM; the latents are scaled, so unscale them.
    from diffusers import DDIMScheduler, DDPMScheduler

    from sdvae.codec.codec import Codec
    from sdvae.images.compose import image_grid
    from sdvae.images.write import save_image
    from sdvae.model.load import load_vae

    sampling = (DDPMScheduler if args.sampler == "ddpm" else DDIMScheduler).from_config(scheduler.config)
    sampling.set_timesteps(args.sample_steps)
    g = seeded_generator(args.seed, "sample")
    latents = []
    with torch.no_grad():
        for i in range(0, max(args.num_stats, args.num_samples), 500):
            x = torch.randn((min(500, max(args.num_stats, args.num_samples) - i), *shape), generator=g).to(device)
            for t in sampling.timesteps:
                x = sampling.step(unet(x, t).sample, t, x, generator=g).prev_sample
            latents.append(x.cpu())
    scaled = torch.cat(latents)
    z = unscale_latents(scaled, data.scaling)
    vae = load_vae(args.vae or data.meta["model"])
    codec = Codec(vae)
    grid = image_grid(codec.decode(z[:args.num_samples]), nrow=math.ceil(math.sqrt(args.num_samples)))
    save_image(grid, out / "samples.png")
    return z


def _generated_stats(args: argparse.Namespace, z: torch.Tensor) -> dict:
    """Per-channel and global mean/std of the first ``--num-stats`` generated latents (unscaled)."""
    stats = z[:args.num_stats].double().transpose(0, 1).reshape(z.shape[1], -1)  # the VAE's channels (FLUX.2: C)
    return {"count": min(args.num_stats, len(z)), "sampler": f"{args.sampler.upper()} {args.sample_steps} steps",
            "channel_mean": stats.mean(1).tolist(), "channel_std": stats.std(1, unbiased=False).tolist(),
            "mean": stats.mean().item(), "std": stats.std(unbiased=False).item()}


def _resume(out: Path, model: Any, optimizer: Any, accelerator: Any) -> tuple[int, dict[str, list]]:
    """(step, loss log of [step, loss] pairs): restored from the newest checkpoint of ``out`` (weights,
    optimizer, RNG states), or (0, empty) for a fresh run. A legacy ``checkpoint.pt`` (a pickle) is never read."""
    if (out / "checkpoint.pt").is_file():
        accelerator.print(f"ignoring {out / 'checkpoint.pt'} (legacy pickle format, not loaded)")
    found = latest_checkpoint(out)
    if found is None:
        return 0, {"train": [], "held_out": []}
    step, _, meta = load_checkpoint(found, modules={"unet": model}, optimizers={"unet": optimizer},
                                    schedulers={}, rank=accelerator.process_index)
    accelerator.print(f"resumed at step {step} from {found}")
    return step, meta["log"]


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel

    args = parse_args(argv)
    accelerator = Accelerator(cpu=not cuda_available())  # without a GPU: gloo multi-process when launched so
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # the UNet's initial weights

    # Data: scaled latents; held-out rows chosen by seed; same-shape batches sharded by rank.
    data = LatentDataset(args.latents, seed=args.seed)
    shapes = data.shapes()
    order = torch.randperm(len(data), generator=seeded_generator(args.seed, "held-out")).tolist()
    held, train_rows = sorted(order[:args.held_out]), sorted(order[args.held_out:])
    sampler = BucketBatchSampler(shapes, args.batch_size, seed=args.seed, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes, indices=train_rows)
    channels, h, w = max(set(shapes), key=shapes.count)

    model = UNet2DModel(sample_size=(h, w), in_channels=channels, out_channels=channels, **PRESETS[args.preset])
    # clip_sample=False: diffusers clips the predicted x0 to [-1, 1] by default (made for pixels); scaled
    # latents have unit variance and channel means up to ~1, so clipping would shrink every sample.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, log = _resume(out, model, optimizer, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Held-out loss: fixed latents (epoch-0 posterior draws), noise and timesteps, so values compare.
    held_z = torch.stack([data[i]["latent"] for i in held]) if held else torch.zeros(0, channels, h, w)
    g = seeded_generator(args.seed, "held-out-noise")
    held_noise = torch.randn(held_z.shape, generator=g)
    held_t = torch.randint(0, 1000, (len(held),), generator=g)

    @torch.no_grad()
    def held_out_loss() -> float:
        if not held:
            return float("nan")
        model.eval()
        losses = []
        for i in range(0, len(held), 256):
            z, eps, t = (x[i:i + 256].to(accelerator.device) for x in (held_z, held_noise, held_t))
            pred = model(scheduler.add_noise(z, eps, t), t).sample
            losses.append(torch.nn.functional.mse_loss(pred, eps, reduction="sum").item())
        model.train()
        return sum(losses) / held_noise.numel()

    def save() -> None:  # on every process (each writes its RNG state); the newest checkpoint only is kept
        save_checkpoint(out, step, modules={"unet": accelerator.unwrap_model(model)}, optimizers={"unet": optimizer},
                        schedulers={}, extra_tensors={}, meta={"log": log}, rank=accelerator.process_index,
                        is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone, keep=1)

    if step == 0:
        log["held_out"].append([0, held_out_loss()])
    start = time.monotonic()
    model.train()
    batches = sampler.stream(step)
    while step < args.steps:
        epoch, batch = next(batches)
        data.set_epoch(epoch)  # new posterior draws each epoch (seeded by (seed, epoch, index))
        z = torch.stack([item["latent"] for item in data.__getitems__(batch)]).to(accelerator.device)
        g = seeded_generator(args.seed, "noise", step, accelerator.process_index)
        noise = torch.randn(z.shape, generator=g).to(z.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g).to(z.device)
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(z, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        log["train"].append([step, accelerator.gather(loss.detach()[None]).mean().item()])
        out_of_time = args.max_minutes and time.monotonic() - start > 60 * args.max_minutes
        if step % args.save_every == 0 or step == args.steps or out_of_time:
            log["held_out"].append([step, held_out_loss()])
            save()
            accelerator.print(f"step {step}: train loss {log['train'][-1][1]:.4f}, "
                              f"held-out {log['held_out'][-1][1]:.4f}, {time.monotonic() - start:.0f} s")
        if out_of_time:
            break
    if not accelerator.is_main_process:
        return {}

    tr = _plot_losses(log, len(held), out)
    unet = accelerator.unwrap_model(model).eval()
    z = _sample(args, unet, scheduler, (channels, h, w), data, accelerator.device, out)
    report = {"steps": step, "preset": args.preset, "batch_size": args.batch_size,
              "processes": accelerator.num_processes, "train_rows": len(train_rows), "held_out_rows": len(held),
              "parameters": sum(p.numel() for p in unet.parameters()), "latent_shape": [channels, h, w],
              "held_out_loss": {"step_0": log["held_out"][0][1], "end": log["held_out"][-1][1]},
              "held_out_curve": log["held_out"],  # [step, loss] at step 0 and at every checkpoint
              "train_loss_last_100": float(tr[-100:, 1].mean()) if len(tr) else None,
              "generated": _generated_stats(args, z),
              "scaling": data.scaling}
    write_json(out / "report.json", report)
    print(json.dumps(report["held_out_loss"]))
    return report


if __name__ == "__main__":
    main()
