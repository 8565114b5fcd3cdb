#!/usr/bin/env python
"""GPU proof of the training step: bf16 and fp16 with the discriminator and LPIPS, next to a plain step.

    python tools/gpu_check.py --out gpu_check.json [--infer] [--data FOLDER]   # one CUDA GPU, ~1-3 min
    python tools/gpu_check.py --device cpu --tiny --out check.json [--infer]   # seconds, CI smoke test

For each precision (bf16, fp16) it trains the ``sd`` preset (random init) at 256², batch 8, 30 steps, with
L1 + LPIPS (random VGG backbone: nothing is downloaded; the packaged LPIPS linear layers are used) + KL +
PatchGAN from step 10, through the same pieces as ``tools/train.py`` (``VAEForward``, ``VAELoss``,
``optimizer_steps`` with a ``GradScaler`` for fp16), and checks: every loss finite, fp32 master weights and
optimizer states, both optimizers stepping (AdamW step counts), exactly one ``scaler.update()`` per
iteration, and the discriminator's gradients unscaled exactly once (after the step they equal the scaled
gradients / scale). Reported next to it: images/s and peak memory of a plain diffusers-style step
(diffusers' ``train_autoencoderkl.py`` shape: VAE forward, MSE + LPIPS under ``no_grad`` + KL, backward,
AdamW, same batch, bf16 autocast), and a 1024² roundtrip in bf16 vs fp32 (PSNR between the outputs).
``--infer`` adds encode+decode time (median of 5 after 2 warm-ups) and peak memory at 512² and 1024²:
plain diffusers fp32, fp32 weights under bf16 autocast, and sdvae's ``Codec`` in bf16 (bf16 weights).

Prints a markdown table and writes the rows as JSON to ``--out``; exits 1 if a check fails.
``--tiny`` uses the ``test`` preset at 64², 3 steps (discriminator from step 1) for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdvae.codec.codec import Codec
from sdvae.metrics.lpips import build_lpips
from sdvae.model.build import build_preset
from sdvae.model.info import downsample_factor
from sdvae.train.config import LossConfig
from sdvae.train.losses import VAELoss
from sdvae.train.modules import decoder_last_layer
from sdvae.train.optim import optimizer_steps
from sdvae.train.vae_forward import VAEForward


def synthetic_images(n: int, size: int, seed: int, device: str) -> torch.Tensor:
    """Smooth random images in [-1, 1]: a few random sinusoid gradients per channel plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(4):
        freq = torch.rand(n, 3, 2, generator=g) * 12
        phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
        out += torch.sin(freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy + phase)
    out = out / 4 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return out.clamp(-1, 1).to(device)


def folder_images(path: str, n: int, size: int, device: str) -> torch.Tensor:
    """The first ``n`` images of a folder, center-cropped to ``size`` (sdvae's validation crops)."""
    from sdvae.images.sources import open_source
    from sdvae.train.datasets import ValDataset

    data = ValDataset(open_source(path, "image", "train"), size, size, list(range(n)))
    return torch.stack([data[i]["pixels"] for i in range(len(data))]).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def _adam_steps(opt: torch.optim.Optimizer) -> int:
    """How many steps (Adam)W has taken (0 before the first)."""
    return max((int(s["step"]) for s in opt.state.values() if "step" in s), default=0)


def train_check(precision: str, args: argparse.Namespace, images: torch.Tensor, lpips_net) -> dict:
    """Our training step (train.py's pieces) for ``args.steps`` steps in ``precision``; checks + speed."""
    device, dtype = args.device, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(0)
    vae = build_preset(args.preset).to(device).train()
    cfg = LossConfig(recon="l1", lpips_weight=1.0, kl_weight=1e-6, disc_weight=0.5, disc_start=args.disc_start,
                     disc_layers=2 if args.tiny else 3)
    loss_fn = VAELoss(cfg, lpips_model=lpips_net, disc_ndf=8 if args.tiny else 64).to(device)
    model = VAEForward(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-5, betas=(0.5, 0.9))
    disc_opt = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-5, betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler(device.split(":")[0], init_scale=2.0**16) if precision == "fp16" else None
    updates: list[int] = []
    if scaler is not None:
        original_update = scaler.update
        scaler.update = lambda *a, **k: (updates.append(1), original_update(*a, **k))[1]
    last_layer = decoder_last_layer(vae)
    failures: list[str] = []
    skipped = 0
    eps_gen = torch.Generator().manual_seed(1)
    latent = args.size // downsample_factor(vae)
    _reset_peak(device)
    timed_from = min(3, args.steps - 1)
    seconds = 0.0  # training work only (steps from timed_from on): the checks below are not timed
    for step in range(args.steps):
        eps = torch.randn(images.shape[0], vae.config.latent_channels, latent, latent, generator=eps_gen).to(device)
        _sync(device)
        tick = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dtype):
            recon, mean, logvar = model(images, eps)
            g_loss, g_logs = loss_fn.generator_loss(images, recon, mean, logvar, step, last_layer)
        (scaler.scale(g_loss) if scaler else g_loss).backward()
        with torch.autocast(device.split(":")[0], dtype=dtype):
            d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step)
        (scaler.scale(d_loss) if scaler else d_loss).backward()
        _sync(device)
        seconds += (time.perf_counter() - tick) if step >= timed_from else 0.0
        disc_on = loss_fn.disc_active(step)
        scaled = [p.grad.detach().clone() for p in loss_fn.discriminator.parameters()] if disc_on and scaler else None
        scale = scaler.get_scale() if scaler else 1.0
        before, counts = len(updates), (_adam_steps(opt), _adam_steps(disc_opt))
        tick = time.perf_counter()
        optimizer_steps(scaler, opt, list(vae.parameters()), 1.0, disc_opt if disc_on else None)
        _sync(device)
        seconds += (time.perf_counter() - tick) if step >= timed_from else 0.0
        if scaler is not None and len(updates) - before != 1:
            failures.append(f"step {step}: {len(updates) - before} scaler updates")
        # Both optimizers step on every iteration (the discriminator from disc_start), except an fp16
        # step the scaler skipped for inf/NaN gradients, which lowers the scale.
        backed_off = scaler is not None and scaler.get_scale() < scale
        skipped += backed_off
        if _adam_steps(opt) != counts[0] + 1 and not backed_off:
            failures.append(f"step {step}: the VAE's optimizer did not step")
        if disc_on and _adam_steps(disc_opt) != counts[1] + 1 and not backed_off:
            failures.append(f"step {step}: the discriminator's optimizer did not step")
        if scaled is not None and all(bool(torch.isfinite(g).all()) for g in scaled):
            # scaler.step unscaled the discriminator's grads in place: exactly once?
            for p, s in zip(loss_fn.discriminator.parameters(), scaled, strict=True):
                if not torch.allclose(p.grad, s / scale, rtol=1e-3, atol=1e-12):
                    failures.append(f"step {step}: discriminator gradients not unscaled exactly once")
                    break
        opt.zero_grad(set_to_none=True)
        disc_opt.zero_grad(set_to_none=True)
        logs = {**g_logs, **d_logs}
        if not all(math.isfinite(v) for v in logs.values()):
            failures.append(f"step {step}: non-finite loss {logs}")
    state_dtypes = {t.dtype for s in [*opt.state.values(), *disc_opt.state.values()] for t in s.values()
                    if torch.is_tensor(t) and t.is_floating_point()}
    param_dtypes = {p.dtype for p in [*vae.parameters(), *loss_fn.discriminator.parameters()]}
    if param_dtypes != {torch.float32} or state_dtypes - {torch.float32}:
        failures.append(f"master weights/states not fp32: {param_dtypes} {state_dtypes}")
    if _adam_steps(opt) < args.steps - skipped or _adam_steps(disc_opt) < args.steps - args.disc_start - skipped:
        failures.append(f"optimizer step counts: vae {_adam_steps(opt)}, disc {_adam_steps(disc_opt)}, "
                        f"{skipped} skipped")
    rate = images.shape[0] * (args.steps - timed_from) / seconds
    return {"what": f"train sdvae {precision} (+disc, LPIPS)", "images_per_s": rate, "peak_gib": _peak_gib(device),
            "loss": logs["loss"], "disc_loss": logs["disc_loss"],
            "scaler_updates": len(updates), "skipped_steps": skipped,
            "vae_steps": _adam_steps(opt), "disc_steps": _adam_steps(disc_opt),
            "final_scale": scaler.get_scale() if scaler else None,
            "ok": not failures, "failures": failures[:5]}


def baseline_step(args: argparse.Namespace, images: torch.Tensor, lpips_net) -> dict:
    """diffusers' train_autoencoderkl.py step shape: forward, MSE + no-grad LPIPS + KL, backward, AdamW."""
    device = args.device
    torch.manual_seed(0)
    vae = build_preset(args.preset).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    # the example's plain `lpips.LPIPS`: default memory format (build_lpips returns a channels-last backbone)
    lpips_net = copy.deepcopy(lpips_net).to(memory_format=torch.contiguous_format)
    _reset_peak(device)
    timed_from = min(3, args.steps - 1)
    start = 0.0
    for step in range(args.steps):
        if step == timed_from:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            posterior = vae.encode(images).latent_dist
            pred = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean()
            mse = F.mse_loss(pred.float(), images.float())
            with torch.no_grad():
                lp = lpips_net(pred.float(), images.float()).mean()
            loss = mse + 0.1 * lp + 1e-6 * kl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"what": "baseline diffusers-style bf16 (no disc, LPIPS no-grad)", "ok": math.isfinite(float(loss)),
            "images_per_s": images.shape[0] * (args.steps - timed_from) / seconds, "peak_gib": _peak_gib(device),
            "loss": float(loss), "failures": []}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def _timed(fn, device: str, repeats: int, warmup: int) -> tuple[torch.Tensor, float, float]:
    """(output, median seconds, peak GiB) of ``fn()``."""
    for _ in range(warmup):
        fn()
    _reset_peak(device)
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), _peak_gib(device)


def roundtrips(args: argparse.Namespace, sizes: list[int], repeats: int, warmup: int, label: str) -> list[dict]:
    """Encode+decode (posterior mean) of one image per size: diffusers fp32, bf16 autocast, Codec bf16."""
    device, rows = args.device, []
    vae = build_preset(args.preset).to(device).eval()
    codec = Codec(build_preset(args.preset), device=device, dtype="bf16", tile="off")
    for size in sizes:
        x = synthetic_images(1, size, 7, device)

        @torch.inference_mode()
        def plain(autocast: bool, x=x):
            ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                return vae.decode(vae.encode(x).latent_dist.mean).sample.float()

        ref, t32, m32 = _timed(lambda: plain(False), device, repeats, warmup)
        auto, tac, mac = _timed(lambda: plain(True), device, repeats, warmup)
        low, tbf, mbf = _timed(lambda x=x: codec.roundtrip(x)[0], device, repeats, warmup)
        variants = (("diffusers fp32", ref, t32, m32), ("diffusers fp32 + bf16 autocast", auto, tac, mac),
                    ("sdvae Codec bf16 weights", low, tbf, mbf))
        for what, out, sec, mem in variants:
            rows.append({"what": f"{label} {size}² {what}", "seconds": sec, "peak_gib": mem,
                         "psnr_vs_fp32": _psnr(out.cpu(), ref.cpu()) if out is not ref else None,
                         "ok": bool(torch.isfinite(out).all())})
    return rows


def markdown(rows: list[dict]) -> str:
    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = ["what", "ok", "images_per_s", "seconds", "peak_gib", "psnr_vs_fp32", "loss", "vae_steps", "disc_steps",
            "scaler_updates", "skipped_steps"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="test preset, 64², 3 steps (CPU smoke test)")
    parser.add_argument("--data", default="", help="image folder instead of synthetic images")
    parser.add_argument("--infer", action="store_true", help="also time inference at 512² and 1024²")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu --tiny for the CPU smoke test)")
    args.preset, args.size, args.batch = ("test", 64, 2) if args.tiny else ("sd", 256, 8)
    args.steps, args.disc_start = (3, 1) if args.tiny else (30, 10)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    images = (folder_images(args.data, args.batch, args.size, args.device) if args.data
              else synthetic_images(args.batch, args.size, 0, args.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lpips_net = build_lpips("squeeze" if args.tiny else "vgg", random_backbone=True).to(args.device)
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "preset": args.preset, "size": args.size, "batch": args.batch,
            "steps": args.steps, "disc_start": args.disc_start}
    rows = [train_check(p, args, images, lpips_net) for p in ("bf16", "fp16")]
    rows.append(baseline_step(args, images, lpips_net))
    rows += roundtrips(args, [64 if args.tiny else 1024], repeats=1, warmup=0 if args.tiny else 1, label="roundtrip")
    if args.infer:
        rows += roundtrips(args, [64] if args.tiny else [512, 1024], repeats=1 if args.tiny else 5,
                           warmup=0 if args.tiny else 2, label="infer")
    print(json.dumps(info))
    print(markdown(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED: {r['what']}: {r.get('failures')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
