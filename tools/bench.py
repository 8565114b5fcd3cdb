"""Benchmarks for sdvae. One subcommand per benchmark; each prints its figures as plain text.

    python tools/bench.py tiling [--size 1024] [--big 2048] [--roundtrip 2048,4096]
    python tools/bench.py train [--preset tiny --batch 16 --resolution 64 --lpips 0.5 --precisions no,bf16]
                                [--breakdown]
    python tools/bench.py encode [--model tiny --images 256 --resolution 256 --batch 16 --processes 2]
    python tools/bench.py infer [--presets sd,tiny --sizes 256,512 --modes diffusers-fp32,default,fp32,bf16]

Every figure that is compared is measured in the same run. Peak memory is always measured in a fresh
subprocess (the ``_decode-child`` / ``_train-child`` subcommands), so one measurement's allocations
never inflate another's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))


def _peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss is in kB on Linux, bytes on macOS; only reached off Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _latents(size: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, size // 8, size // 8, generator=gen)


def _decode(vae, z, mode: str):
    """Decode (1,4,h,w) latents with 'untiled' | 'tiled' (ours) | 'diffusers' (enable_tiling)."""
    import torch

    from sdvae.codec.tiling import tiled_decode

    with torch.inference_mode():
        if mode == "tiled":
            return tiled_decode(vae, z)
        if mode == "diffusers":
            vae.enable_tiling()
            try:
                return vae.decode(z).sample
            finally:
                vae.disable_tiling()
        return vae.decode(z).sample


def cmd_decode_child(args: argparse.Namespace) -> None:
    """One decode in this (fresh) process; prints JSON {seconds, peak_rss} for the parent."""
    import torch

    from sdvae.model.build import build_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_preset(args.preset)
    z = _latents(args.size)
    base = _peak_rss_bytes()
    start = time.perf_counter()
    out = _decode(vae, z, args.mode)
    seconds = time.perf_counter() - start
    assert out.shape[-1] == args.size
    print(json.dumps({"seconds": seconds, "peak_rss": _peak_rss_bytes(), "rss_before": base}))


def _run_child(*argv: str) -> dict:
    """``tools/bench.py <argv>`` in a fresh process (its own peak memory); the JSON its last line prints."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(mode: str, size: int, preset: str) -> dict:
    return _run_child("_decode-child", "--mode", mode, "--size", str(size), "--preset", preset)


def _roundtrip_child(size: int, preset: str, folder: Path) -> dict:
    """``sdvae roundtrip --tile on`` of a size² photo-like image in a fresh process: seconds, peak RSS."""
    import numpy as np
    from PIL import Image

    image = folder / f"photo{size}.png"
    if not image.exists():  # smooth colour fields plus grain: PNG-compressible, not flat
        rng = np.random.default_rng(size)
        base = Image.fromarray(rng.integers(0, 256, (size // 64, size // 64, 3), dtype=np.uint8))
        pixels = np.asarray(base.resize((size, size), Image.BICUBIC), dtype=np.int16)
        pixels = pixels + rng.integers(-8, 9, pixels.shape, dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(image)
    cmd = [sys.executable, "-m", "sdvae", "roundtrip", str(image), "--model", preset, "--tile", "on", "--json",
           "-o", str(folder / f"photo{size}.recon.png")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss is its VmHWM in kB
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"sdvae roundtrip {size}² failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "psnr": result["psnr"], "dtype": result["dtype"]}


def cmd_tiling(args: argparse.Namespace) -> None:
    """Exactness of our tiled decode vs untiled (and diffusers' tiling), then memory at a big size."""
    from sdvae.model.build import build_preset

    gib = 1024**3
    print(f"preset {args.preset} (seeded random weights), random N(0,1) latents; differences on the [0,1] scale")
    if args.size:
        vae = build_preset(args.preset)
        z = _latents(args.size)
        results = {}
        for mode in ("untiled", "tiled", "diffusers"):
            start = time.perf_counter()
            results[mode] = _decode(vae, z, mode).float()
            print(f"  {args.size}² decode {mode:>9}: {time.perf_counter() - start:7.1f} s", flush=True)
        ref = results.pop("untiled")
        for mode, out in results.items():
            diff = (out - ref).abs() / 2  # [-1,1] -> [0,1] scale
            name = "ours (exact tiling)" if mode == "tiled" else "diffusers enable_tiling"
            print(f"  {args.size}² {name:>24}: max |diff| {diff.max().item():.3g} "
                  f"({diff.max().item() * 255:.3g}/255), mean {diff.mean().item():.3g}")
        del vae, results, ref
    if args.big:
        print("peak RSS (VmHWM) of a fresh subprocess each, torch + diffusers + model included:", flush=True)
        base = _child("untiled", args.size or 1024, args.preset) if not args.skip_untiled else None
        big = _child("tiled", args.big, args.preset)
        if base:
            print(f"  untiled {args.size or 1024}² decode: {base['peak_rss'] / gib:.2f} GiB, {base['seconds']:.1f} s")
        print(f"  tiled   {args.big}² decode: {big['peak_rss'] / gib:.2f} GiB, {big['seconds']:.1f} s"
              f" (before decoding: {big['rss_before'] / gib:.2f} GiB)")
        if base:
            print(f"  ratio tiled {args.big}² / untiled {args.size or 1024}²: {big['peak_rss'] / base['peak_rss']:.2f}")
    sizes = [int(s) for s in args.roundtrip.split(",") if s.strip()]
    if sizes:
        print("`sdvae roundtrip --tile on` (load, encode, decode, PSNR/SSIM, both PNGs), peak RSS of a fresh process:",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="sdvae-bench-") as tmp:
            for size in sizes:
                row = _roundtrip_child(size, args.preset, Path(tmp))
                print(f"  roundtrip {size}²: {row['peak_rss'] / 1e9:.2f} GB ({row['peak_rss'] / gib:.2f} GiB), "
                      f"{row['seconds']:.1f} s, {row['dtype']}", flush=True)


def _synthetic_batches(count: int, batch: int, resolution: int, seed: int = 0):
    """``count`` photo-like (B,3,R,R) batches in [-1, 1]: smooth colour fields plus fine grain.

    Speed does not depend on content, and both training steps get exactly the same batches.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.rand(batch, 3, max(1, resolution // 8), max(1, resolution // 8), generator=gen)
        x = F.interpolate(coarse, size=(resolution, resolution), mode="bicubic", align_corners=False)
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
        out.append(x.clamp(0, 1) * 2 - 1)
    return out


def _peak_memory(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()


def _plain_lpips(args, device):
    """The frozen LPIPS of users' scripts (a plain ``lpips.LPIPS(net=...)``, default memory format), or None
    with ``--lpips 0``; ``build_lpips`` itself returns a channels-last backbone."""
    import torch

    from sdvae.metrics.lpips import build_lpips

    if args.lpips <= 0:
        return None
    return build_lpips(args.lpips_net, random_backbone=True).to(device, memory_format=torch.contiguous_format)


def _our_train_step(vae, args, total_steps: int):
    """The step tools/train.py runs: one module through accelerate (autocast, fp32 master weights),
    VAELoss (LPIPS with gradient), clipping, AdamW + schedule, EMA."""
    import torch
    from accelerate import Accelerator

    from sdvae.train.config import LossConfig, OptimConfig
    from sdvae.train.ema import EMA
    from sdvae.train.losses import VAELoss
    from sdvae.train.optim import build_optimizer
    from sdvae.train.vae_forward import VAEForward

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.precision)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format  # train.channels_last
    vae.to(memory_format=fmt)
    loss_fn = VAELoss(LossConfig(recon=args.recon, lpips_weight=args.lpips, lpips_net=args.lpips_net,
                                 kl_weight=args.kl_weight), random_lpips_backbone=True)
    loss_fn.to(accelerator.device)  # (its LPIPS backbone is channels-last already: build_lpips)
    if args.channels_last:
        loss_fn.to(memory_format=fmt)
    optim_cfg = OptimConfig(lr=args.lr, betas=(0.9, 0.99), grad_clip=1.0)
    opt, sched = build_optimizer(vae.parameters(), args.lr, optim_cfg, total_steps)
    model, opt = accelerator.prepare(VAEForward(vae), opt)
    ema = EMA(vae, 0.999)
    params = [p for p in vae.parameters() if p.requires_grad]

    def step(i: int, images, eps) -> float:
        images = images.contiguous(memory_format=fmt)
        with accelerator.autocast():
            recon, mean, logvar = model(images, eps)
            loss, logs = loss_fn.generator_loss(images, recon, mean, logvar, i)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, optim_cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(vae)
        return logs["loss"]

    return step, accelerator.device


def _reference_train_step(vae, args, total_steps: int):
    """A plain diffusers-style step (as in diffusers' train_autoencoderkl.py, minus its defects):
    fp32, ``vae.encode``/``vae.decode`` called directly, the same loss terms with the same weights
    (LPIPS with gradient, KL with our per-element reduction), clipping, AdamW; no EMA."""
    import torch
    import torch.nn.functional as F


    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(device)
    lpips_model = _plain_lpips(args, device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def step(i: int, images, eps) -> float:
        posterior = vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, images) if args.recon == "mse" else F.l1_loss(recon, images)
        loss = rec + args.kl_weight * posterior.kl().mean() / images[0].numel()
        if lpips_model is not None:
            loss = loss + args.lpips * lpips_model(recon, images).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, device


def _example_train_step(vae, args, total_steps: int):
    """The generator step of diffusers' ``examples/research_projects/autoencoderkl/train_autoencoderkl.py``,
    shaped as users run it: ``vae.encode``/``vae.decode`` called directly, per-image summed
    reconstruction loss plus LPIPS computed *without* gradient (as the example does), summed KL, a
    PatchGAN forward on the reconstruction and the adaptive weight from two ``autograd.grad`` calls
    on the decoder's last layer every step, one backward, clipping, AdamW. Same precision (accelerate
    autocast) as the step it is compared with; the example's alternate discriminator iterations are
    not timed (they add a full VAE forward each, so this row flatters the example)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from sdvae.train.discriminator import NLayerDiscriminator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.precision)
    disc = NLayerDiscriminator(3, 64, 3, "batch")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae, disc, opt = accelerator.prepare(vae, disc, opt)
    lpips_model = _plain_lpips(args, accelerator.device)
    last_layer = accelerator.unwrap_model(vae).decoder.conv_out.weight

    def step(i: int, images, eps) -> float:
        with accelerator.autocast():
            posterior = accelerator.unwrap_model(vae).encode(images).latent_dist
            z = posterior.mean + posterior.std * eps
            recon = accelerator.unwrap_model(vae).decode(z).sample
            rec = (F.mse_loss if args.recon == "mse" else F.l1_loss)(recon.float(), images.float(), reduction="none")
            if lpips_model is not None:
                with torch.no_grad():
                    p_loss = lpips_model(recon, images)
                rec = rec + args.lpips * p_loss
            nll = rec.sum() / rec.shape[0]
            kl = posterior.kl().sum() / images.shape[0]
            g_loss = -disc(recon).mean()
            nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            weight = (torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)).clamp(0.0, 1e4).detach()
            loss = nll + args.kl_weight * kl + 0.5 * weight * g_loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss) / images[0].numel()  # per element, comparable with the other rows

    return step, accelerator.device


def cmd_train_child(args: argparse.Namespace) -> None:
    """Time one kind of training step in this (fresh) process; prints JSON for the parent."""
    import torch

    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor

    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_preset(args.preset).train()
    factor = downsample_factor(vae)
    total = args.warmup + args.steps
    make = {"ours": _our_train_step, "reference": _reference_train_step, "example": _example_train_step}[args.mode]
    step, device = make(vae, args, total)
    batches = _synthetic_batches(total, args.batch, args.resolution)
    latent = (vae.config.latent_channels, args.resolution // factor, args.resolution // factor)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(args.batch, *latent, generator=gen) for _ in range(total)]
    losses = []
    for i in range(total):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        losses.append(step(i, batches[i].to(device), noise[i].to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": args.steps * args.batch / seconds, "peak_memory": _peak_memory(device),
                      "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
                      "device": str(device)}))


def cmd_train_parts(args: argparse.Namespace) -> None:
    """Seconds per batch of each part of our step in isolation (fresh process): the VAE's forward +
    backward, LPIPS with the gradient our loss needs, LPIPS without gradient (what the example runs).
    Median of ``--steps`` after ``--warmup``; prints JSON for the parent."""
    import statistics

    import torch
    import torch.nn.functional as F

    from sdvae.metrics.lpips import build_lpips, lpips_distance
    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor
    from sdvae.train.vae_forward import VAEForward

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    vae = build_preset(args.preset).train().to(device)
    lp = build_lpips(args.lpips_net, random_backbone=True).to(device)  # as VAELoss builds it
    images = _synthetic_batches(1, args.batch, args.resolution)[0].to(device)
    factor = downsample_factor(vae)
    eps = torch.randn(args.batch, vae.config.latent_channels, args.resolution // factor, args.resolution // factor,
                      generator=torch.Generator().manual_seed(1)).to(device)
    recon = (0.9 * images).detach()  # a stand-in reconstruction: LPIPS' cost does not depend on content

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    forward = VAEForward(vae)  # what our step runs

    def vae_step() -> None:
        with autocast():
            out, _, _ = forward(images, eps)
            loss = F.mse_loss(out.float(), images)
        loss.backward()
        vae.zero_grad(set_to_none=True)

    def lpips_grad() -> None:
        leaf = recon.clone().requires_grad_()
        with autocast():
            dist = lpips_distance(lp, images, leaf).mean()
        dist.backward()

    def lpips_no_grad() -> None:
        with torch.no_grad(), autocast():
            lpips_distance(lp, images, recon)

    def median_seconds(fn) -> float:
        times = []
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(json.dumps({"vae": median_seconds(vae_step), "lpips_grad": median_seconds(lpips_grad),
                      "lpips_no_grad": median_seconds(lpips_no_grad)}))


def cmd_train(args: argparse.Namespace) -> None:
    """Our training step vs the steps users would run instead: images/s, peak memory, ratios.

    Rows: a plain fp32 step with our loss terms (``reference``), and per precision the step of
    diffusers' published ``train_autoencoderkl.py`` (``example``: LPIPS without gradient, PatchGAN
    forward and two ``autograd.grad`` calls every step) and ours (LPIPS *with* gradient, EMA, schedule).
    """
    shared = ["--preset", args.preset, "--batch", str(args.batch), "--resolution", str(args.resolution),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--recon", args.recon,
              "--lpips", str(args.lpips), "--lpips-net", args.lpips_net, "--kl-weight", str(args.kl_weight),
              "--lr", str(args.lr)]
    runs = {"reference (fp32)": ["--mode", "reference"]}
    for precision in args.precisions.split(","):
        runs[f"example ({precision})"] = ["--mode", "example", "--precision", precision]
        runs[f"ours ({precision})"] = ["--mode", "ours", "--precision", precision]
        if args.channels_last:
            runs[f"ours ({precision}, CL)"] = ["--mode", "ours", "--precision", precision, "--channels-last"]
    losses = f"{args.recon}" + (f" + {args.lpips}·LPIPS-{args.lpips_net} (random backbone)" if args.lpips else "") \
        + f" + {args.kl_weight:g}·KL"
    print(f"preset {args.preset}, batch {args.batch}, {args.resolution}², loss {losses}, AdamW lr {args.lr:g}, "
          f"clip 1.0; {args.warmup} warm-up + {args.steps} timed steps on the same synthetic batches; "
          f"peak memory = {'max allocated' if _cuda() else 'peak RSS'} of a fresh process each; "
          f"example = diffusers' train_autoencoderkl.py generator step (LPIPS without gradient, "
          f"PatchGAN + 2 autograd.grad)")
    results = {}
    for name, extra in runs.items():
        results[name] = r = _run_child("_train-child", *shared, *extra)
        print(f"  {name:>18}: {r['images_per_s']:7.2f} images/s, peak {r['peak_memory'] / 1024**3:5.2f} GiB, "
              f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} (mean of last 5) on {r['device']}", flush=True)
    ref = results["reference (fp32)"]
    for precision in args.precisions.split(","):
        example = results[f"example ({precision})"]
        for name in [f"ours ({precision})"] + ([f"ours ({precision}, CL)"] if args.channels_last else []):
            ours = results[name]
            for base_name, base in ((f"example ({precision})", example), ("reference (fp32)", ref)):
                print(f"  {name} / {base_name}: {ours['images_per_s'] / base['images_per_s']:.2f}x images/s, "
                      f"{ours['peak_memory'] / base['peak_memory']:.2f}x peak memory")
        if args.breakdown and args.lpips > 0:
            _print_breakdown(shared, precision, args.batch / example["images_per_s"])


def _print_breakdown(shared: list[str], precision: str, example_seconds: float) -> None:
    """Where our step's time goes, and the fastest it could be against the example's step.

    Our loss needs the VAE's forward + backward and LPIPS with gradient (target branch, reconstruction
    branch, backward into the reconstruction); even with optimizer, EMA, KL and everything else free,
    ours / example stays near example seconds / (VAE + LPIPS with gradient). The parts are timed apart,
    so the estimate carries the rows' run-to-run noise.
    """
    parts = _run_child("_train-parts", *shared, "--precision", precision)
    floor = parts["vae"] + parts["lpips_grad"]
    print(f"  breakdown ({precision}, isolated, median per batch): VAE forward + backward {parts['vae']:.3f} s; "
          f"LPIPS with gradient {parts['lpips_grad']:.3f} s; LPIPS without gradient {parts['lpips_no_grad']:.3f} s",
          flush=True)
    print(f"  ceiling ({precision}): example step {example_seconds:.3f} s / (VAE + LPIPS with gradient) "
          f"{floor:.3f} s = {example_seconds / floor:.2f}x — about the most any step computing our loss can "
          f"reach against the example (isolated timings; same noise as the rows)", flush=True)


def _write_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` photo-like JPEGs (smooth colour fields + grain), about size x 1.25·size, varied aspect."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = size + int(rng.integers(0, size // 4 + 1)), size + int(rng.integers(size // 8, size // 2 + 1))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        phase = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(5 * xx + phase[0]), np.cos(4 * yy + phase[1]), np.sin(3 * (xx - yy) + phase[2])], -1)
        img = (img * 0.5 + 0.5) + rng.normal(0, 0.03, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def _encode_cli(data: Path, out: Path, args: argparse.Namespace, processes: int) -> dict:
    """Run ``sdvae encode-dataset`` in a fresh process group; images/s = all images / slowest rank's time."""
    import os

    launcher = [sys.executable, "-m", "sdvae.cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
        "sdvae.cli"]
    cmd = [*launcher, "encode-dataset", str(data), str(out), "--model", args.model, "--resolution",
           str(args.resolution), "--batch-size", str(args.batch), "--num-workers", str(args.workers),
           "--dtype", args.dtype, "--shard-size", str(args.shard_size), "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    images = sum(r["encoded"] for r in ranks)
    seconds = max(r["seconds"] for r in ranks)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def cmd_encode(args: argparse.Namespace) -> None:
    """encode-dataset images/s vs a bare ``vae.encode`` loop over pre-loaded tensors (same run), and N processes."""
    import shutil
    import tempfile

    import torch

    from sdvae.images.sources import open_source
    from sdvae.latents.export import EncodeOptions, preprocess, run_encode
    from sdvae.model.dtypes import torch_dtype
    from sdvae.model.info import downsample_factor
    from sdvae.model.load import load_vae

    work = Path(tempfile.mkdtemp(prefix="sdvae-bench-encode-"))
    try:
        data = Path(args.data) if args.data else work / "images"
        if not args.data:
            _write_photos(data, args.images, args.resolution * 5 // 4)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vae = load_vae(args.model).to(device, torch_dtype(args.dtype)).eval()
        factor = downsample_factor(vae)
        source = open_source(str(data))
        pixels = [preprocess(source.load(i), args.resolution, "center", factor)[0] for i in range(len(source))]
        batches = [torch.stack(pixels[i:i + args.batch]) for i in range(0, len(pixels), args.batch)]
        print(f"model {args.model}, {len(source)} images ({source.describe()}), {args.resolution}² center crops, "
              f"batch {args.batch}, {args.dtype}, {device}, torch threads {torch.get_num_threads()}, "
              f"{args.workers} DataLoader worker(s)", flush=True)

        def bare() -> float:
            """A bare ``vae.encode`` loop over pre-loaded, pre-resized tensors: images/s."""
            with torch.inference_mode():
                vae.encode(batches[0].to(device, torch_dtype(args.dtype)))  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in batches:
                    vae.encode(batch.to(device, torch_dtype(args.dtype))).latent_dist.mean.cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return len(pixels) / (time.perf_counter() - start)

        first = bare()
        start = time.perf_counter()
        summary = run_encode(EncodeOptions(src=str(data), out=str(work / "out"), model=args.model,
                                           resolution=args.resolution, batch_size=args.batch, dtype=args.dtype,
                                           num_workers=args.workers, shard_size=args.shard_size, progress=False))
        wall = time.perf_counter() - start
        second = bare()
        reference = (first + second) / 2
        job = summary["images_per_s"]
        print(f"  bare vae.encode loop (pre-loaded tensors): {reference:8.1f} images/s "
              f"(before {first:.1f}, after {second:.1f})")
        print(f"  encode-dataset (decode+resize in workers, write shards): {job:8.1f} images/s "
              f"({summary['encoded']} images in {summary['seconds']:.2f} s; {wall:.2f} s with start-up)")
        print(f"  ratio encode-dataset / bare loop: {job / reference:.2f}x", flush=True)
        if args.processes > 1:
            one = _encode_cli(data, work / "p1", args, 1)
            many = _encode_cli(data, work / f"p{args.processes}", args, args.processes)
            print(f"  encode-dataset, 1 process: {one['images_per_s']:8.1f} images/s; {args.processes} processes "
                  f"(torchrun): {many['images_per_s']:8.1f} images/s; speed-up "
                  f"{many['images_per_s'] / one['images_per_s']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


INFER_MODES = ("diffusers-fp32", "default", "fp32", "bf16", "fp16")


def _infer_model(preset: str):
    """The ``tiny`` rows use the embedded checkpoint (real weights); other presets seeded random weights."""
    from sdvae.model.build import build_preset
    from sdvae.model.load import load_vae

    embedded = REPO / "checkpoints" / "sdvae-tiny-f8c4"
    return load_vae(embedded) if preset == "tiny" and (embedded / "config.json").is_file() else build_preset(preset)


def cmd_infer_child(args: argparse.Namespace) -> None:
    """One inference mode in this (fresh) process: median seconds of encode+decode, peak RSS, output."""
    import statistics

    import torch

    from sdvae.codec.codec import Codec

    if args.threads:
        torch.set_num_threads(args.threads)
    vae = _infer_model(args.preset)
    x = _synthetic_batches(1, 1, args.size, seed=1)[0]
    if args.mode == "diffusers-fp32":  # what a user writes with diffusers alone
        vae = vae.to(args.device).eval()

        def run() -> torch.Tensor:
            with torch.no_grad():
                return vae.decode(vae.encode(x.to(args.device)).latent_dist.mean).sample.float().cpu()
        used = "fp32"
    else:
        codec = Codec(vae, device=args.device, dtype="auto" if args.mode == "default" else args.mode, tile="auto")

        def run() -> torch.Tensor:
            return codec.roundtrip(x)[0]
        used = codec.dtype_name
    times = []
    for i in range(args.warmup + args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.save:
        torch.save({"out": out, "x": x}, args.save)
    print(json.dumps({"seconds": statistics.median(times), "peak_rss": _peak_rss_bytes(), "dtype": used}))


def cmd_infer(args: argparse.Namespace) -> None:
    """Encode+decode speed of sdvae's modes against plain diffusers fp32, same weights, same input."""
    import tempfile

    import torch

    from sdvae.metrics.pixel import psnr, quantize

    gib = 1024**3
    modes = [m for m in args.modes.split(",") if m]
    print(f"encode+decode of one photo-like image, median of {args.repeats} after {args.warmup} warm-up, "
          f"device {args.device}, torch threads {torch.get_num_threads()}; each mode in a fresh process")
    print("| preset | size | mode | precision | seconds | speed vs diffusers fp32 | peak RSS GiB | PSNR vs diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            for size in (int(v) for v in args.sizes.split(",")):
                rows = {}
                for mode in modes:
                    save = str(Path(tmp) / f"{preset}-{size}-{mode}.pt")
                    rows[mode] = _run_child("_infer-child", "--mode", mode, "--preset", preset, "--size", str(size),
                                            "--device", args.device, "--save", save, "--repeats", str(args.repeats),
                                            "--warmup", str(args.warmup)) | {"save": save}
                base = rows.get("diffusers-fp32")
                ref = torch.load(base["save"], weights_only=True)["out"] if base else None
                for mode, row in rows.items():
                    out = torch.load(row["save"], weights_only=True)["out"]
                    speed = f"{base['seconds'] / row['seconds']:.2f}x" if base else "-"
                    close = f"{float(psnr(quantize(out), quantize(ref))[0]):.1f} dB" if ref is not None else "-"
                    if mode == "diffusers-fp32":
                        close = "(reference)"
                    print(f"| {preset} | {size}² | {mode} | {row['dtype']} | {row['seconds']:.2f} | {speed} | "
                          f"{row['peak_rss'] / gib:.2f} | {close} |", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_train_precisions() -> str:
    from sdvae.model.dtypes import cpu_has_native_bf16

    return "bf16,fp16" if _cuda() else "bf16" if cpu_has_native_bf16() else "no"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiling", help="exact tiled decode: accuracy vs untiled/diffusers, peak RSS at a big size")
    p.add_argument("--size", type=int, default=1024, help="image side for the accuracy comparison (0: skip)")
    p.add_argument("--big", type=int, default=2048, help="image side for the memory measurement (0: skip)")
    p.add_argument("--preset", default="sd")
    p.add_argument("--skip-untiled", action="store_true", help="do not measure the untiled peak RSS")
    p.add_argument("--roundtrip", default="2048", help="comma-separated image sides for the `sdvae roundtrip` "
                   "peak RSS (e.g. 2048,4096; empty: skip)")
    p.set_defaults(func=cmd_tiling)

    def train_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="tiny")
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--resolution", type=int, default=64)
        p.add_argument("--steps", type=int, default=20, help="timed steps")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
        p.add_argument("--recon", choices=("mse", "l1"), default="mse")
        p.add_argument("--lpips", type=float, default=0.1, help="LPIPS weight (0: off); random backbone")
        p.add_argument("--lpips-net", choices=("vgg", "alex", "squeeze"), default="vgg")
        p.add_argument("--kl-weight", type=float, default=1e-6)
        p.add_argument("--lr", type=float, default=4e-4)
        p.add_argument("--channels-last", action="store_true",
                       help="our step with channels-last weights and images (train.channels_last)")

    p = sub.add_parser("train", help="our training step vs diffusers' example step and a plain fp32 step")
    train_args(p)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's parts in isolation and print the ceiling of ours / example")
    p.add_argument("--precisions", default=_default_train_precisions(),
                   help="comma-separated mixed precisions of the example's and our step (no, bf16, fp16); "
                   "default: bf16,fp16 on CUDA, bf16 on CPUs with native bf16, else no")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="encode-dataset images/s vs a bare vae.encode loop; 1 vs N processes")
    p.add_argument("--model", default="tiny", help="model reference (preset, folder, file)")
    p.add_argument("--data", help="image folder to encode (default: generated JPEGs in a temp folder)")
    p.add_argument("--images", type=int, default=256, help="number of generated images")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of encode-dataset")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--processes", type=int, default=1, help="also compare 1 vs N processes (torchrun)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("infer", help="encode+decode speed: plain diffusers fp32 vs sdvae's default and each dtype")
    p.add_argument("--presets", default="sd,tiny", help="comma-separated presets (tiny: the embedded checkpoint)")
    p.add_argument("--sizes", default="256,512", help="comma-separated image sides")
    p.add_argument("--modes", default="diffusers-fp32,default,fp32,bf16",
                   help=f"comma-separated, from {', '.join(INFER_MODES)} (default: sdvae's --dtype auto)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("_infer-child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=INFER_MODES, required=True)
    p.add_argument("--preset", default="sd")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--save", default="")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_infer_child)

    p = sub.add_parser("_train-child", help=argparse.SUPPRESS)
    train_args(p)
    p.add_argument("--mode", choices=("ours", "reference", "example"), required=True)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_train_child)

    p = sub.add_parser("_train-parts", help=argparse.SUPPRESS)
    train_args(p)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_train_parts)

    p = sub.add_parser("_decode-child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("untiled", "tiled", "diffusers"), required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--preset", default="sd")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_decode_child)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
