"""Benchmarks for sdvae. One subcommand per benchmark; each prints its figures (markdown tables where rows compare).

    python tools/bench.py tiling [--size 1024] [--big 2048] [--roundtrip 2048,4096]
    python tools/bench.py train [--preset tiny --batch 16 --resolution 64 --lpips 0.5 --precisions no,bf16]
                                [--breakdown] [--disc-weight 0.5] [--peak-tflops N]
    python tools/bench.py encode [--model tiny --data FOLDER --shards 7 --resolution 256 --batch 16 --engines 1,2,ray]
    python tools/bench.py infer [--presets sd,tiny --sizes 256,512 --modes diffusers-fp32,default,compiled]
    python tools/bench.py gpu [--out bench_gpu.json] [--data FOLDER]      # one CUDA GPU: training, inference,
    python tools/bench.py gpu --device cpu --tiny --out check.json        # encode-dataset; CPU smoke test

Every figure that is compared is measured in the same run. Peak memory is always measured in a fresh
subprocess (the hidden ``_…-child`` subcommands), so one measurement's allocations never inflate another's
high-water mark. The shared pieces (inputs, timing, memory, children, FLOPs, step recipes, tables) live in
the ``benchkit`` package next to this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for _path in (REPO, TOOLS):  # run as a script from a checkout without installing; benchkit sits next to us
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchkit import children, report  # noqa: E402
from benchkit.memory import peak_kind  # noqa: E402
from benchkit.timing import interleaved  # noqa: E402

from sdvae.device import cuda_available, resolve_device  # noqa: E402  (light: torch loads on first call)
from sdvae.heap import keep_freed_memory  # noqa: E402

GIB = 1024**3


def _bench_child(*argv: str) -> dict:
    """``tools/bench.py <argv>`` in a fresh process (its own peak memory); the JSON its last line prints."""
    return children.run_json(children.script(Path(__file__).resolve(), *argv))


def _throughput(row: dict, device, precision: str, peak_override: float | None) -> dict:
    """``row`` with TFLOP/s achieved (its ``flops`` over its ``seconds``) and the share of the device's peak."""
    from benchkit import flops

    peak, source = flops.device_peak(device, precision, peak_override)
    tflops = flops.achieved(row.get("flops"), row.get("seconds", 0.0))
    return row | {"tflops": tflops, "peak_tflops": peak, "peak_source": source, "share": flops.share(tflops, peak)}


# -- tiling -----------------------------------------------------------------------------------------------


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
    from benchkit.inputs import latents
    from benchkit.memory import peak_rss_bytes
    from benchkit.timing import time_calls

    from sdvae.model.build import build_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_preset(args.preset)
    z = latents(args.size)
    base = peak_rss_bytes()
    out, watch = time_calls(lambda: _decode(vae, z, args.mode), repeats=1, warmup=0)
    assert out.shape[-1] == args.size
    print(json.dumps({"seconds": watch.total, "peak_rss": peak_rss_bytes(), "rss_before": base}))


def _decode_child(mode: str, size: int, preset: str) -> dict:
    return _bench_child("_decode-child", "--mode", mode, "--size", str(size), "--preset", preset)


def _roundtrip_child(size: int, preset: str, folder: Path) -> dict:
    """``sdvae roundtrip --tile on`` of a size² photo-like image in a fresh process: seconds, peak RSS."""
    from benchkit.inputs import write_photo

    image = folder / f"photo{size}.png"
    if not image.exists():  # smooth colour fields plus grain: PNG-compressible, not flat
        write_photo(image, size, seed=size, detail=64)
    result = children.run([sys.executable, "-m", "sdvae", "roundtrip", str(image), "--model", preset, "--tile", "on",
                           "--json", "-o", str(folder / f"photo{size}.recon.png")])
    out = result.last_json()
    return {"seconds": result.seconds, "peak_rss": result.peak_rss, "psnr": out["psnr"], "dtype": out["dtype"]}


def _tiling_accuracy(args: argparse.Namespace) -> None:
    from benchkit.inputs import latents
    from benchkit.timing import time_calls

    from sdvae.model.build import build_preset

    vae = build_preset(args.preset)
    z = latents(args.size)
    results = {}
    for mode in ("untiled", "tiled", "diffusers"):
        out, watch = time_calls(lambda mode=mode: _decode(vae, z, mode).float(), repeats=1, warmup=0)
        results[mode] = out
        print(f"  {args.size}² decode {mode:>9}: {watch.total:7.1f} s", flush=True)
    ref = results.pop("untiled")
    for mode, out in results.items():
        diff = (out - ref).abs() / 2  # [-1,1] -> [0,1] scale
        name = "ours (exact tiling)" if mode == "tiled" else "diffusers enable_tiling"
        print(f"  {args.size}² {name:>24}: max |diff| {diff.max().item():.3g} "
              f"({diff.max().item() * 255:.3g}/255), mean {diff.mean().item():.3g}")


def _tiling_memory(args: argparse.Namespace) -> None:
    print("peak RSS (VmHWM) of a fresh subprocess each, torch + diffusers + model included:", flush=True)
    small = args.size or 1024
    base = _decode_child("untiled", small, args.preset) if not args.skip_untiled else None
    big = _decode_child("tiled", args.big, args.preset)
    if base:
        print(f"  untiled {small}² decode: {base['peak_rss'] / GIB:.2f} GiB, {base['seconds']:.1f} s")
    print(f"  tiled   {args.big}² decode: {big['peak_rss'] / GIB:.2f} GiB, {big['seconds']:.1f} s"
          f" (before decoding: {big['rss_before'] / GIB:.2f} GiB)")
    if base:
        print(f"  ratio tiled {args.big}² / untiled {small}²: {big['peak_rss'] / base['peak_rss']:.2f}")


def cmd_tiling(args: argparse.Namespace) -> None:
    """Exactness of our tiled decode vs untiled (and diffusers' tiling), then memory at a big size."""
    print(f"preset {args.preset} (seeded random weights), random N(0,1) latents; differences on the [0,1] scale")
    if args.size:
        _tiling_accuracy(args)
    if args.big:
        _tiling_memory(args)
    sizes = [int(s) for s in args.roundtrip.split(",") if s.strip()]
    if sizes:
        print("`sdvae roundtrip --tile on` (load, encode, decode, PSNR/SSIM, both PNGs), peak RSS of a fresh process:",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="sdvae-bench-") as tmp:
            for size in sizes:
                row = _roundtrip_child(size, args.preset, Path(tmp))
                print(f"  roundtrip {size}²: {row['peak_rss'] / 1e9:.2f} GB ({row['peak_rss'] / GIB:.2f} GiB), "
                      f"{row['seconds']:.1f} s, {row['dtype']}", flush=True)


# -- train ------------------------------------------------------------------------------------------------


def cmd_train_child(args: argparse.Namespace) -> None:
    """Time one recipe (benchkit.steps) in this (fresh) process; prints JSON for the parent."""
    import torch
    from benchkit.steps import TrainSpec, build_recipe, timed_steps

    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heap:
        keep_freed_memory()
    spec = TrainSpec.from_args(args)
    vae = build_preset(spec.preset).train()
    latent = spec.resolution // downsample_factor(vae)
    recipe = build_recipe(args.mode, vae, spec, args.warmup + args.steps)
    print(json.dumps(timed_steps(recipe, spec, (vae.config.latent_channels, latent, latent), args.steps,
                                 args.warmup)))


def cmd_train_parts(args: argparse.Namespace) -> None:
    """Seconds per batch of each part of our step in isolation (fresh process): the VAE's forward +
    backward, LPIPS with the gradient our loss needs, LPIPS without gradient (what the example runs).
    Median of ``--steps`` after ``--warmup``; prints JSON for the parent."""
    import torch
    import torch.nn.functional as F
    from benchkit.inputs import posterior_noise, synthetic_batches
    from benchkit.steps import TrainSpec, build_lpips, spec_device
    from benchkit.timing import time_calls

    from sdvae.metrics.lpips import lpips_distance
    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor
    from sdvae.train.vae_forward import VAEForward

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TrainSpec.from_args(args)
    device = spec_device(spec)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    vae = build_preset(spec.preset).train().to(device)
    lp = build_lpips(spec, device)  # as VAELoss gets it
    images = synthetic_batches(1, spec.batch, spec.resolution)[0].to(device)
    latent = spec.resolution // downsample_factor(vae)
    eps = posterior_noise(1, spec.batch, (vae.config.latent_channels, latent, latent))[0].to(device)
    recon = (0.9 * images).detach()  # a stand-in reconstruction: LPIPS' cost does not depend on content
    forward = VAEForward(vae)  # what our step runs

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def vae_step() -> None:
        with autocast():
            loss = F.mse_loss(forward(images, eps)[0].float(), images)
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

    parts = {"vae": vae_step, "lpips_grad": lpips_grad, "lpips_no_grad": lpips_no_grad}
    print(json.dumps({k: time_calls(fn, device, args.steps, args.warmup)[1].median for k, fn in parts.items()}))


def _heap(args: argparse.Namespace, ours: bool) -> bool:
    """Whether a row's process runs :func:`~sdvae.heap.keep_freed_memory` first: ours always (sdvae's commands
    and tools/train.py do), the peers with ``--heap-for-peers`` (the allocator's share of a ratio)."""
    return ours or getattr(args, "heap_for_peers", False)


def _train_runs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Row name -> the ``_train-child`` flags of that row."""
    runs = {"ldm same-work (fp32)": ["--mode", "ldm", "--precision", "no"]}
    for precision in args.precisions.split(","):
        if precision != "no":
            runs[f"ldm same-work ({precision})"] = ["--mode", "ldm", "--precision", precision]
        runs[f"example ({precision})"] = ["--mode", "example", "--precision", precision]
        runs[f"ours ({precision})"] = ["--mode", "ours", "--precision", precision]
        if args.channels_last:
            runs[f"ours ({precision}, CL)"] = ["--mode", "ours", "--precision", precision, "--channels-last"]
    return runs


TRAIN_COLUMNS = [("what", "step"), ("images_per_s", "images/s"), ("peak_gib", "peak GiB"), ("tflops", "TFLOP/s"),
                 ("share_pct", "share of peak"), ("first_loss", "first loss"), ("last_loss", "loss (last 5)")]


def cmd_train(args: argparse.Namespace) -> None:
    """Our training step vs the steps users would run instead: images/s, peak memory, TFLOP/s, ratios.

    Rows (benchkit.steps): the LDM-style step doing the same work as ours (fp32 and each precision),
    the step of diffusers' published ``train_autoencoderkl.py`` (``example``) and ours, per precision.
    """
    shared = ["--preset", args.preset, "--batch", str(args.batch), "--resolution", str(args.resolution),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--recon", args.recon,
              "--lpips", str(args.lpips), "--lpips-net", args.lpips_net, "--kl-weight", str(args.kl_weight),
              "--lr", str(args.lr), "--disc-weight", str(args.disc_weight), "--disc-start", str(args.disc_start)]
    losses = f"{args.recon}" + (f" + {args.lpips}·LPIPS-{args.lpips_net} (random backbone)" if args.lpips else "") \
        + f" + {args.kl_weight:g}·KL" + (f" + {args.disc_weight}·PatchGAN" if args.disc_weight else "")
    print(f"preset {args.preset}, batch {args.batch}, {args.resolution}², loss {losses}, AdamW lr {args.lr:g}, "
          f"clip 1.0; {args.warmup} warm-up + {args.steps} timed steps on the same synthetic batches, median of "
          f"{args.rounds} interleaved round(s); "
          f"peak memory = {peak_kind(resolve_device())}, a fresh process per row; "
          f"FLOPs of one step counted by FlopCounterMode; example = diffusers' train_autoencoderkl.py "
          f"generator step (LPIPS without gradient, PatchGAN + 2 autograd.grad)", flush=True)
    runs = _train_runs(args)
    results, rows = {}, []
    def child(name: str) -> dict:
        return _bench_child("_train-child", *shared, *runs[name],
                            *(["--heap"] if _heap(args, runs[name][1] == "ours") else []))

    for name, rounds in interleaved(list(runs), args.rounds, child).items():
        speeds = [r["images_per_s"] for r in rounds]
        r = results[name] = rounds[-1] | {"images_per_s": statistics.median(speeds), "rounds": speeds,
                                          "seconds_per_step": args.batch / statistics.median(speeds)}
        precision = runs[name][runs[name].index("--precision") + 1]
        row = _throughput(r | {"what": name, "flops": r["flops_per_step"], "seconds": r["seconds_per_step"]},
                          r["device"], precision, args.peak_tflops)
        rows.append(row | {"peak_gib": r["peak_memory"] / GIB, "share_pct": report.percent(row["share"])})
    print(report.markdown(rows, TRAIN_COLUMNS))
    print("peak TFLOP/s: " + "; ".join(sorted({f"{r['peak_tflops']:.3g} ({r['peak_source']})" for r in rows})))
    _print_train_ratios(args, results)


def _print_train_ratios(args: argparse.Namespace, results: dict[str, dict]) -> None:
    for precision in args.precisions.split(","):
        example = results[f"example ({precision})"]
        bases = [f"example ({precision})", f"ldm same-work ({'fp32' if precision == 'no' else precision})"]
        bases += ["ldm same-work (fp32)"] if precision != "no" else []
        for name in [f"ours ({precision})"] + ([f"ours ({precision}, CL)"] if args.channels_last else []):
            ours = results[name]
            for base_name in bases:
                base = results[base_name]
                paired = sorted(a / b for a, b in zip(ours["rounds"], base["rounds"], strict=True))
                print(f"  {name} / {base_name}: {ours['images_per_s'] / base['images_per_s']:.2f}x images/s"
                      + (f" (medians; per round {paired[0]:.2f}–{paired[-1]:.2f}x)" if len(paired) > 1 else "")
                      + f", {ours['peak_memory'] / base['peak_memory']:.2f}x peak memory")
        if args.breakdown and args.lpips > 0:
            _print_breakdown(args, precision, args.batch / example["images_per_s"])


def _print_breakdown(args: argparse.Namespace, precision: str, example_seconds: float) -> None:
    """Where our step's time goes, and the fastest it could be against the example's step.

    Our loss needs the VAE's forward + backward and LPIPS with gradient (target branch, reconstruction
    branch, backward into the reconstruction); even with optimizer, EMA, KL and everything else free,
    ours / example stays near example seconds / (VAE + LPIPS with gradient). The parts are timed apart,
    so the estimate carries the rows' run-to-run noise.
    """
    parts = _bench_child("_train-parts", "--preset", args.preset, "--batch", str(args.batch), "--resolution",
                         str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
                         "--lpips", str(args.lpips), "--lpips-net", args.lpips_net, "--precision", precision)
    floor = parts["vae"] + parts["lpips_grad"]
    print(f"  breakdown ({precision}, isolated, median per batch): VAE forward + backward {parts['vae']:.3f} s; "
          f"LPIPS with gradient {parts['lpips_grad']:.3f} s; LPIPS without gradient {parts['lpips_no_grad']:.3f} s",
          flush=True)
    print(f"  ceiling ({precision}): example step {example_seconds:.3f} s / (VAE + LPIPS with gradient) "
          f"{floor:.3f} s = {example_seconds / floor:.2f}x — about the most any step computing our loss can "
          f"reach against the example (isolated timings; same noise as the rows)", flush=True)


# -- encode -----------------------------------------------------------------------------------------------

ENCODE_COLUMNS = [("what", "what"), ("images", "images"), ("seconds", "seconds"), ("images_per_s", "images/s"),
                  ("vs_bare", "vs bare loop"), ("waiting_pct", "encoder waiting"), ("note", "note")]


def _encode_cli(src: Path | str, out: Path, args: argparse.Namespace, processes: int,
                engine: str = "torchrun") -> dict:
    """Run ``sdvae encode-dataset`` in a fresh process group (torchrun when ``processes`` > 1).

    images/s = all images / the slowest rank's time; ``waiting_share`` = the time the model waited for
    preprocessed batches over the time it had, all ranks (Ray: all actors) together.
    """
    import os

    launcher = [sys.executable, "-m", "sdvae.cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
        "sdvae.cli"]
    cmd = [*launcher, "encode-dataset", str(src), str(out), "--model", args.model, "--resolution",
           str(args.resolution), "--batch-size", str(args.batch), "--num-workers", str(args.workers),
           "--dtype", args.dtype, "--shard-size", str(args.shard_size), "--json", "--no-progress",
           *(["--engine", engine] if engine != "torchrun" else []),
           *(["--device", args.device] if getattr(args, "device", None) else [])]
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = children.run(cmd, env=env, cwd=REPO)
    ranks = children.json_lines(result.stdout)
    images = sum(r["encoded"] for r in ranks)
    seconds = max(r["seconds"] for r in ranks)
    peak = result.peak_rss if processes == 1 else None  # (torchrun's own, not its workers')
    waiting = sum(r.get("waiting_s", 0.0) for r in ranks)
    had = sum(r["seconds"] * max(1, r.get("ray_workers", 1)) for r in ranks)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "peak_rss": peak,
            "waiting_s": waiting, "waiting_share": waiting / had if had else None}


def _bare_encode(vae, batches: list, device, dtype) -> float:
    """A bare ``vae.encode`` loop over pre-loaded, pre-resized tensors: images/s (one warm-up batch first)."""
    import torch
    from benchkit.timing import Stopwatch

    watch = Stopwatch(device)
    with torch.inference_mode():
        vae.encode(batches[0].to(device, dtype))
        with watch.lap():
            for batch in batches:
                vae.encode(batch.to(device, dtype)).latent_dist.mean.cpu()
    return sum(len(b) for b in batches) / watch.total


def _bare_inputs(data: Path, args: argparse.Namespace):
    """(model on the device in ``--dtype``, the folder's images center-cropped as encode-dataset crops them
    and stacked into (batch,3,R,R) tensors in [-1,1], device, torch dtype, the source's description)."""
    import torch

    from sdvae.images.sources import open_source
    from sdvae.latents.export import crop_for_encoding
    from sdvae.model.dtypes import torch_dtype
    from sdvae.model.info import downsample_factor
    from sdvae.model.load import load_vae

    device, dtype = resolve_device(), torch_dtype(args.dtype)
    vae = load_vae(args.model).to(device, dtype).eval()
    source = open_source(str(data))
    pixels = [crop_for_encoding(source.load(i), args.resolution, "center", downsample_factor(vae))[0]
              for i in range(len(source))]
    batches = [torch.stack(pixels[i:i + args.batch]) for i in range(0, len(pixels), args.batch)]
    return vae, batches, device, dtype, source.describe()


def _encode_images(args: argparse.Namespace, work: Path) -> Path:
    """The folder of images to encode: generated JPEGs (``--images``, 256 by default), ``--data``, or the first
    ``--images`` of ``--data`` linked into ``work``."""
    from benchkit.inputs import image_files, write_photos

    if not args.data:
        write_photos(work / "images", args.images or 256, args.resolution * 5 // 4)
        return work / "images"
    if args.images is None:
        return Path(args.data)
    chosen = image_files(Path(args.data), args.images)
    (work / "images").mkdir()
    for i, path in enumerate(chosen):  # one flat folder, in the same order
        (work / "images" / f"{i:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    return work / "images"


def _engine_names(spec: str) -> list[str]:
    """``--engines``: process counts (1: the CLI in one process; N: torchrun) and ``ray``."""
    names = [e.strip() for e in spec.split(",") if e.strip()]
    bad = [e for e in names if e != "ray" and not (e.isdigit() and int(e) >= 1)]
    if bad or not names:
        raise SystemExit(f"--engines {spec!r}: a comma-separated list of process counts (1, 2, ...) and ray")
    return names


def _engine_row(engine: str, src: str, work: Path, args: argparse.Namespace) -> dict:
    """One row of ``encode``: 1 = the CLI in one process, N = torchrun with N processes, ray = the CLI's
    ``--engine ray``. A Ray engine that fails gives a "not available (reason)" row, never a crash."""
    what = {"1": "1 process (the CLI)", "ray": "Ray engine (--engine ray)"}.get(engine,
                                                                              f"{engine} processes (torchrun)")
    out = work / f"out-{engine}"
    try:
        r = _encode_cli(src, out, args, 1 if engine == "ray" else int(engine), "ray" if engine == "ray" else "torchrun")
    except children.ChildFailed as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        note = f"{'not available' if engine == 'ray' else 'FAILED'} ({lines[-1].strip() if lines else 'no output'})"
        print(f"  {engine}: {note}", flush=True)
        return {"what": what, "kind": "encode", "engine": engine, "ok": engine == "ray", "note": note}
    print(f"  {what}: {r['images_per_s']:.1f} images/s, {r['images']} images in {r['seconds']:.2f} s, encoder "
          f"waiting {report.percent(r['waiting_share'])}", flush=True)
    return {"what": what, "kind": "encode", "engine": engine, "ok": True, **r}


def cmd_encode(args: argparse.Namespace) -> int:
    """encode-dataset images/s vs a bare ``vae.encode`` loop over pre-loaded tensors (same run), per engine;
    with ``--shards N`` on tar shards of the images (the full path: read tar, decode, resize, encode, write)."""
    import shutil

    import torch
    from benchkit.inputs import image_files, pack_shards

    engines = _engine_names(args.engines)
    work = Path(tempfile.mkdtemp(prefix="sdvae-bench-encode-"))
    try:
        data = _encode_images(args, work)
        count = len(image_files(data))
        if args.shards and not 1 <= args.shards <= count:
            raise SystemExit(f"--shards {args.shards}: between 1 and the number of images ({count})")
        src = pack_shards(image_files(data), work / "shards", args.shards) if args.shards else str(data)
        vae, batches, device, dtype, described = _bare_inputs(data, args)
        info = {"model": args.model, "images": count, "source": described, "shards": args.shards,
                "resolution": args.resolution, "batch": args.batch, "dtype": args.dtype, "device": str(device),
                "torch_threads": torch.get_num_threads(), "workers": args.workers, "engines": engines}
        print(f"model {args.model}, {count} images ({described})"
              + (f" packed into {args.shards} tar shards (KEY.jpg + KEY.json)" if args.shards else "")
              + f", {args.resolution}² center crops, batch {args.batch}, {args.dtype}, {device}, torch threads "
              f"{info['torch_threads']}, {args.workers} DataLoader worker(s)", flush=True)
        if _heap(args, False):
            keep_freed_memory()  # the bare loops run in this process; the engines' processes do it themselves
        before = _bare_encode(vae, batches, device, dtype)
        rows = [_engine_row(engine, src, work, args) for engine in engines]
        after = _bare_encode(vae, batches, device, dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare = (before + after) / 2
    rows.insert(0, {"what": "bare vae.encode loop (preloaded tensors)", "kind": "encode", "engine": "bare",
                    "ok": True, "images": count, "images_per_s": bare, "before": before, "after": after,
                    "note": f"before {before:.4g}, after {after:.4g} images/s"})
    for row in rows:
        if "images_per_s" in row:
            row |= {"vs_bare": row["images_per_s"] / bare, "waiting_pct": report.percent(row.get("waiting_share"))}
            row["ok"] = row["images"] == count
    table = report.markdown(rows, ENCODE_COLUMNS)
    print(table)
    if args.out:
        report.write_json(args.out, {"info": info, "rows": rows})
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 1 if any(not row["ok"] for row in rows) else 0


# -- infer ------------------------------------------------------------------------------------------------

# diffusers-fp32: what a user writes with diffusers alone; diffusers-default: the same with the weights cast
# to sdvae's default precision on the device; diffusers-autocast: fp32 weights under autocast in it;
# diffusers-compile: what an expert writes (diffusers' own speed-up guide): default precision, channels-last,
# torch.compile of the encoder and decoder; default / fp32 / bf16 / fp16: sdvae's Codec with --dtype auto /
# that dtype; unfused: the default without the fused eager path (sdvae.codec.fused); compiled: the Codec's
# default with compile=True.
INFER_MODES = ("diffusers-fp32", "diffusers-default", "diffusers-autocast", "diffusers-compile", "default",
               "unfused", "compiled", "fp32", "bf16", "fp16")
INFER_DEFAULT_MODES = "diffusers-fp32,diffusers-default,diffusers-compile,default,compiled"


def _infer_model(preset: str):
    """The ``tiny`` rows use the embedded checkpoint (real weights); other presets seeded random weights."""
    from sdvae.model.build import build_preset
    from sdvae.model.load import load_vae
    from sdvae.model.presets import EMBEDDED_CHECKPOINT

    if preset == "tiny" and (EMBEDDED_CHECKPOINT / "config.json").is_file():
        return load_vae(EMBEDDED_CHECKPOINT)
    return build_preset(preset)


def _infer_runner(vae, mode: str, device: str):
    """(a call doing encode(mean)+decode of one image, the precision it runs in) for ``mode``."""
    import contextlib

    import torch

    from sdvae.codec.codec import Codec
    from sdvae.model.dtypes import resolve_dtype, torch_dtype

    if not mode.startswith("diffusers"):
        codec = Codec(vae, device=device, dtype="auto" if mode in ("default", "unfused", "compiled") else mode,
                      tile="auto", compile=mode == "compiled", fused=False if mode == "unfused" else None)
        return (lambda x: codec.roundtrip(x)[0]), codec.dtype_name
    used = "fp32" if mode == "diffusers-fp32" else resolve_dtype("auto", device)
    cast = torch_dtype(used) if mode in ("diffusers-default", "diffusers-compile") else torch.float32
    vae = vae.to(device, cast).eval()
    if mode == "diffusers-compile":
        vae.to(memory_format=torch.channels_last)
        vae.encoder, vae.decoder = torch.compile(vae.encoder), torch.compile(vae.decoder)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch_dtype(used)) if mode == "diffusers-autocast"
                else contextlib.nullcontext())

    def run(x):
        with torch.no_grad(), autocast:
            return vae.decode(vae.encode(x.to(device, cast)).latent_dist.mean).sample.float().cpu()
    return run, used


def cmd_infer_child(args: argparse.Namespace) -> None:
    """One inference mode in this (fresh) process: median seconds of encode+decode, peak memory, output."""
    import torch
    from benchkit.inputs import synthetic_images
    from benchkit.memory import peak_bytes, reset_peak
    from benchkit.timing import time_calls

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heap:
        keep_freed_memory()
    if args.no_tf32:  # bench.py gpu: fp32 means fp32 (the peak table's fp32 figures are non-TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = synthetic_images(1, args.size, seed=1)
    run, used = _infer_runner(_infer_model(args.preset), args.mode, args.device)
    reset_peak(args.device)
    _, first = time_calls(lambda: run(x), args.device, 1, 0)  # compiled modes: the compile, plus one run
    out, watch = time_calls(lambda: run(x), args.device, args.repeats, max(args.warmup - 1, 0))
    if args.save:
        from safetensors.torch import save_file  # the hand-off to the parent: tensors only, no pickle

        save_file({"out": out.detach().cpu().contiguous(), "x": x.detach().cpu().contiguous()}, args.save)
    print(json.dumps({"seconds": watch.median, "first_seconds": first.total, "peak_memory": peak_bytes(args.device),
                      "dtype": used, "ok": bool(torch.isfinite(out).all())}))


def infer_flops(preset: str, size: int) -> int:
    """FLOPs of one encode(mean)+decode at ``size``² (the useful work of every mode), counted on the meta
    device: shapes only, nothing computed."""
    import torch
    from benchkit.flops import count_flops

    vae = _infer_model(preset).to("meta").eval()
    x = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad():
        return count_flops(lambda: vae.decode(vae.encode(x).latent_dist.mean).sample)[1]


def infer_rows(preset: str, size: int, modes: list[str], args: argparse.Namespace, tmp: str) -> list[dict]:
    """Each mode in its own ``_infer-child``: seconds, peak memory, TFLOP/s and share of peak, PSNR and
    speed against diffusers fp32 (when among ``modes``)."""
    from safetensors.torch import load_file

    flops = infer_flops(preset, size)
    saves = {mode: str(Path(tmp) / f"{preset}-{size}-{mode}.safetensors") for mode in modes}  # each mode's output

    def child(mode: str) -> dict:
        return _bench_child("_infer-child", "--mode", mode, "--preset", preset, "--size", str(size),
                            "--device", args.device, "--save", saves[mode], "--repeats", str(args.repeats),
                            "--warmup", str(args.warmup), *(["--no-tf32"] if getattr(args, "no_tf32", False) else []),
                            *(["--heap"] if _heap(args, not mode.startswith("diffusers")) else []))

    rows = {}
    for mode, runs in interleaved(modes, getattr(args, "rounds", 1), child).items():
        seconds = [r["seconds"] for r in runs]
        rows[mode] = runs[-1] | {"seconds": statistics.median(seconds), "rounds": seconds}
    for mode, child in rows.items():
        rows[mode] = _throughput(child | {"flops": flops}, args.device, child["dtype"], args.peak_tflops)
        rows[mode] |= {"what": f"infer {preset} {size}² {mode}", "kind": "infer", "preset": preset,
                       "size": f"{size}²", "mode": mode, "precision": child["dtype"], "save": saves[mode]}
    base, same = rows.get("diffusers-fp32"), rows.get("diffusers-default")
    ref = load_file(base["save"])["out"] if base else None
    for mode, row in rows.items():
        out = load_file(row.pop("save"))["out"]
        row["speed"] = f"{base['seconds'] / row['seconds']:.2f}x" if base else "–"
        row["speed_same"] = (f"{same['seconds'] / row['seconds']:.2f}x"
                             if same and same["precision"] == row["precision"] else "–")
        row["psnr_vs_fp32"] = report.psnr(out, ref) if ref is not None and mode != "diffusers-fp32" else None
        row["peak_gib"], row["share_pct"] = row["peak_memory"] / GIB, report.percent(row["share"])
    return list(rows.values())


INFER_COLUMNS = [("preset", "preset"), ("size", "size"), ("mode", "mode"), ("precision", "precision"),
                 ("seconds", "seconds"), ("first_seconds", "first call s"), ("speed", "speed vs diffusers fp32"),
                 ("speed_same", "speed vs diffusers same precision"), ("peak_gib", "peak GiB"),
                 ("tflops", "TFLOP/s"), ("share_pct", "share of peak"), ("psnr_vs_fp32", "PSNR vs diffusers fp32")]


def cmd_infer(args: argparse.Namespace) -> None:
    """Encode+decode speed of sdvae's modes against plain diffusers fp32, same weights, same input."""
    import torch

    modes = [m for m in args.modes.split(",") if m]
    print(f"encode+decode of one photo-like image, median of {args.repeats} after {args.warmup} warm-up "
          f"(and of {args.rounds} interleaved rounds), "
          f"device {args.device}, torch threads {torch.get_num_threads()}; each mode in a fresh process; "
          f"FLOPs of encode(mean)+decode counted once per preset and size (FlopCounterMode, meta device); "
          f"PSNR on 8-bit outputs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            for size in (int(v) for v in args.sizes.split(",")):
                rows += infer_rows(preset, size, modes, args, tmp)
    print(report.markdown(rows, INFER_COLUMNS))
    print("peak TFLOP/s: " + "; ".join(sorted({f"{r['peak_tflops']:.3g} ({r['peak_source']})" for r in rows})))


def _default_train_precisions() -> str:
    from sdvae.model.dtypes import cpu_has_native_bf16

    return "bf16,fp16" if cuda_available() else "bf16" if cpu_has_native_bf16() else "no"


# -- gpu --------------------------------------------------------------------------------------------------

# row -> (recipe, precision): our step with every AMP check (benchkit.gpu), then its peers, same batch
GPU_TRAIN_ROWS = {"train ours bf16": ("ours", "bf16"), "train ours fp16": ("ours", "fp16"),
                  "train ldm same-work fp32": ("ldm", "no"), "train ldm same-work bf16": ("ldm", "bf16"),
                  "train example bf16": ("example", "bf16")}
GPU_INFER_MODES = ["diffusers-fp32", "diffusers-default", "unfused", "default"]
GPU_COMPILE_MODES = ["diffusers-compile", "compiled"]  # at the largest size only (compiling takes minutes)
GPU_COLUMNS = [("what", "what"), ("ok", "ok"), ("images_per_s", "images/s"), ("seconds", "seconds"),
               ("first_seconds", "first call s"),
               ("peak_gib", "peak GiB"), ("tflops", "TFLOP/s"), ("share_pct", "share of peak"),
               ("psnr_vs_fp32", "PSNR vs fp32"), ("loss", "loss"), ("vae_steps", "VAE steps"),
               ("disc_steps", "disc steps"), ("scaler_updates", "scaler updates"), ("skipped_steps", "skipped")]


def _gpu_sizes(args: argparse.Namespace) -> dict:
    """Steps and sizes of every part: a full GPU run, or ``--tiny`` (seconds on a CPU)."""
    if args.tiny:
        return {"steps": 3, "infer": [64], "preset": "test", "repeats": 1, "warmup": 0, "encode": (8, 64, 4)}
    return {"steps": 30, "infer": [512, 1024], "preset": "sd", "repeats": 5, "warmup": 2, "encode": (256, 256, 16)}


def cmd_gpu_child(args: argparse.Namespace) -> None:
    """One training row of ``gpu`` in this (fresh) process; prints the row as JSON."""
    import math

    import torch
    from benchkit.gpu import gpu_spec, ours_check
    from benchkit.inputs import folder_images, synthetic_images
    from benchkit.steps import build_recipe, timed_steps

    from sdvae.model.build import build_preset
    from sdvae.model.info import downsample_factor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mode, precision = GPU_TRAIN_ROWS[args.row]
    spec, steps = gpu_spec(args.tiny, args.device, precision), _gpu_sizes(args)["steps"]
    images = (folder_images(args.data, spec.batch, spec.resolution) if args.data
              else synthetic_images(spec.batch, spec.resolution, seed=0))
    if mode == "ours":
        row = ours_check(spec, steps, images)
    else:
        torch.manual_seed(0)
        vae = build_preset(spec.preset)
        latent = spec.resolution // downsample_factor(vae)
        warmup = min(3, steps - 1)
        r = timed_steps(build_recipe(mode, vae, spec, steps), spec, (vae.config.latent_channels, latent, latent),
                        steps - warmup, warmup, batches=[images])
        row = {"images_per_s": r["images_per_s"], "seconds": r["seconds_per_step"], "peak_memory": r["peak_memory"],
               "flops": r["flops_per_step"], "loss": r["last_loss"], "ok": math.isfinite(r["last_loss"]),
               "failures": [] if math.isfinite(r["last_loss"]) else ["non-finite loss"]}
    print(json.dumps(row | {"what": args.row, "kind": "train", "precision": precision}))


def _gpu_common(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, *(["--tiny"] if args.tiny else []), *(["--data", args.data] if args.data else [])]


def _failed(what: str, kind: str, error: Exception) -> dict:
    """The row of a part whose child crashed: the table and JSON are still written, the run exits 1."""
    print(f"  {what}: FAILED", flush=True)
    return {"what": what, "kind": kind, "ok": False, "failures": [str(error)[-1500:]]}


def _gpu_train(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (_, precision) in GPU_TRAIN_ROWS.items():
        try:
            row = _bench_child("_gpu-child", "--row", name, *_gpu_common(args))
        except children.ChildFailed as e:
            rows.append(_failed(name, "train", e))
            continue
        row = _throughput(row, args.device, precision, args.peak_tflops)
        rows.append(row | {"peak_gib": row["peak_memory"] / GIB, "share_pct": report.percent(row["share"])})
        print(f"  {name}: {'ok' if row['ok'] else 'FAILED'}, {row['images_per_s']:.3g} images/s", flush=True)
    return rows


def _gpu_infer(args: argparse.Namespace, tmp: str) -> list[dict]:
    sizes = _gpu_sizes(args)
    ns = argparse.Namespace(device=args.device, repeats=sizes["repeats"], warmup=sizes["warmup"],
                            peak_tflops=args.peak_tflops, no_tf32=True)
    rows = []
    for size in sizes["infer"]:
        try:
            modes = GPU_INFER_MODES + (GPU_COMPILE_MODES if not args.tiny and size == max(sizes["infer"]) else [])
            part = infer_rows(sizes["preset"], size, modes, ns, tmp)
        except children.ChildFailed as e:
            rows.append(_failed(f"infer {sizes['preset']} {size}²", "infer", e))
            continue
        for row in part:
            row["failures"] = [] if row["ok"] else ["non-finite output"]
        rows += part
        print(f"  infer {size}²: {'ok' if all(r['ok'] for r in part) else 'FAILED'}", flush=True)
    return rows


def _gpu_encode(args: argparse.Namespace, tmp: str) -> dict:
    """``sdvae encode-dataset`` of generated JPEGs in a fresh process: images/s; ok when every image is encoded."""
    from benchkit.inputs import write_photos

    count, resolution, batch = _gpu_sizes(args)["encode"]
    write_photos(Path(tmp) / "images", count, resolution * 5 // 4)
    ns = argparse.Namespace(model="test" if args.tiny else "tiny", resolution=resolution, batch=batch, workers=2,
                            dtype="auto", shard_size=1000, device=args.device)
    what = f"encode-dataset {ns.model} {count} images {resolution}²"
    try:
        r = _encode_cli(Path(tmp) / "images", Path(tmp) / "latents", ns, 1)
    except children.ChildFailed as e:
        return _failed(what, "encode", e)
    ok = r["images"] == count
    return {"what": what, "kind": "encode", "ok": ok,
            "images_per_s": r["images_per_s"], "seconds": r["seconds"],
            "peak_gib": r["peak_rss"] / GIB if args.device == "cpu" else None,  # on CUDA: not GPU memory
            "failures": [] if ok else [f"encoded {r['images']} of {count}"]}


def cmd_gpu(args: argparse.Namespace) -> int:
    """Training (our step's AMP checks, its peers), inference and encode-dataset on one device; JSON + table."""
    import torch

    if args.device.startswith("cuda") and not cuda_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for the CPU smoke test)")
    sizes = _gpu_sizes(args)
    info = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "preset": sizes["preset"], "steps": sizes["steps"],
            "tf32": False, "note": "peak memory: CUDA max allocated, or peak RSS of a fresh process on CPU"}
    print(json.dumps(info), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdvae-bench-gpu-") as tmp:
        rows = _gpu_train(args) + _gpu_infer(args, tmp) + [_gpu_encode(args, tmp)]
    info["seconds"] = time.perf_counter() - start
    info["peak_tflops"] = sorted({f"{r['peak_tflops']:.4g} ({r['peak_source']})" for r in rows if "peak_tflops" in r})
    table = report.markdown(rows, GPU_COLUMNS)
    print(table)
    print("peak TFLOP/s: " + "; ".join(info["peak_tflops"]))
    report.write_json(args.out, {"info": info, "rows": rows})
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED: {r['what']}: {r.get('failures')}", file=sys.stderr)
    return 1 if failed else 0


# -- command line -----------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--disc-weight", type=float, default=0.0,
                   help="PatchGAN weight of ours and the LDM step (0: none; the example always runs its own)")
    p.add_argument("--disc-start", type=int, default=0, help="step from which the PatchGAN counts")
    p.add_argument("--channels-last", action="store_true",
                   help="our step with channels-last weights and images (train.channels_last)")


def _peak_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the share-of-peak column (default: the known-device "
                   "table on CUDA, a GEMM of the same precision measured in this run on CPU)")


def _heap_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heap-for-peers", action="store_true",
                   help="run the peers' rows with sdvae.heap.keep_freed_memory() too (ours always runs with it, as "
                   "sdvae's commands and tools/train.py do): the allocator's share of each ratio")


def _public_parsers(sub) -> None:
    p = sub.add_parser("tiling", help="exact tiled decode: accuracy vs untiled/diffusers, peak RSS at a big size")
    p.add_argument("--size", type=int, default=1024, help="image side for the accuracy comparison (0: skip)")
    p.add_argument("--big", type=int, default=2048, help="image side for the memory measurement (0: skip)")
    p.add_argument("--preset", default="sd")
    p.add_argument("--skip-untiled", action="store_true", help="do not measure the untiled peak RSS")
    p.add_argument("--roundtrip", default="2048", help="comma-separated image sides for the `sdvae roundtrip` "
                   "peak RSS (e.g. 2048,4096; empty: skip)")
    p.set_defaults(func=cmd_tiling)

    p = sub.add_parser("train", help="our training step vs the LDM-style step, diffusers' example step")
    _train_args(p)
    _peak_arg(p)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row's child this many times, interleaved (odd rounds in reverse order); "
                   "images/s: the median over rounds, ratios also per round")
    _heap_arg(p)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's parts in isolation and print the ceiling of ours / example")
    p.add_argument("--precisions", default=_default_train_precisions(),
                   help="comma-separated mixed precisions of the example's and our step (no, bf16, fp16); "
                   "default: bf16,fp16 on CUDA, bf16 on CPUs with native bf16, else no")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="encode-dataset images/s vs a bare vae.encode loop, per engine; on tar shards "
                       "of real JPEGs with --shards")
    p.add_argument("--model", default="tiny", help="model reference (preset, folder, file)")
    p.add_argument("--data", help="image folder to encode (default: generated JPEGs in a temp folder)")
    p.add_argument("--images", type=int, default=None,
                   help="number of images: generated ones (default 256), or the first N of --data (default all)")
    p.add_argument("--shards", type=int, default=0, help="pack the images into N WebDataset tar shards (KEY.jpg + "
                   "KEY.json, original bytes, as img2dataset writes them) and encode the shards (0: the folder)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of encode-dataset")
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per output shard of a folder source")
    p.add_argument("--engines", default="1", help="comma-separated rows: 1 (the CLI in one process), N "
                   "(torchrun, N processes), ray (--engine ray); e.g. 1,2,ray")
    p.add_argument("--out", default="", help="also write the rows as JSON here (the table: same name, .md)")
    _heap_arg(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("infer", help="encode+decode speed: plain diffusers fp32 vs sdvae's default and each dtype")
    p.add_argument("--presets", default="sd,tiny", help="comma-separated presets (tiny: the embedded checkpoint)")
    p.add_argument("--sizes", default="256,512", help="comma-separated image sides")
    p.add_argument("--modes", default=INFER_DEFAULT_MODES,
                   help=f"comma-separated, from {', '.join(INFER_MODES)} (default: sdvae's --dtype auto; "
                   "compiled: with Codec(compile=True); the first call column holds the compile)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every mode's child this many times, interleaved (odd rounds in reverse order); "
                   "seconds: the median over rounds, so one slow stretch of a shared machine cannot decide a ratio")
    _peak_arg(p)
    _heap_arg(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("gpu", help="the prepared GPU script: training checks and peers, inference, encode-dataset; "
                       "JSON + markdown, exit 1 if a check fails")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="test preset, 64², 3 steps (the CPU smoke test)")
    p.add_argument("--data", default="", help="image folder for the training rows instead of synthetic images")
    p.add_argument("--infer", action="store_true", help="accepted for gpu_check.py's command line: inference "
                   "always runs")
    p.add_argument("--out", default="bench_gpu.json", help="JSON file for the results (the table: same name, .md)")
    _peak_arg(p)
    p.set_defaults(func=cmd_gpu)


def _child_parsers(sub) -> None:
    p = sub.add_parser("_infer-child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=INFER_MODES, required=True)
    p.add_argument("--preset", default="sd")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--save", default="")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--heap", action="store_true", help="keep_freed_memory() first, as sdvae's commands do")
    p.set_defaults(func=cmd_infer_child)

    for name, func in (("_train-child", cmd_train_child), ("_train-parts", cmd_train_parts)):
        p = sub.add_parser(name, help=argparse.SUPPRESS)
        _train_args(p)
        if name == "_train-child":
            p.add_argument("--mode", choices=("ours", "ldm", "example", "reference"), required=True)
        p.add_argument("--precision", default="bf16")
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--heap", action="store_true", help="keep_freed_memory() first, as tools/train.py does")
        p.set_defaults(func=func)

    p = sub.add_parser("_gpu-child", help=argparse.SUPPRESS)
    p.add_argument("--row", choices=list(GPU_TRAIN_ROWS), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--data", default="")
    p.set_defaults(func=cmd_gpu_child)

    p = sub.add_parser("_decode-child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("untiled", "tiled", "diffusers"), required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--preset", default="sd")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_decode_child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _public_parsers(sub)
    _child_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
