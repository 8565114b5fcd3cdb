"""Benchmarks for sdvae. One subcommand per benchmark; each prints its figures as plain text.

    python tools/bench.py tiling [--size 1024] [--big 2048]

Peak memory is always measured in a fresh subprocess (the ``_decode-child`` subcommand), so one
measurement's allocations never inflate another's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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

    from sdvae.tiling import tiled_decode

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

    from sdvae.model import build_preset

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


def _child(mode: str, size: int, preset: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_decode-child", "--mode", mode, "--size", str(size),
           "--preset", preset]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_tiling(args: argparse.Namespace) -> None:
    """Exactness of our tiled decode vs untiled (and diffusers' tiling), then memory at a big size."""
    from sdvae.model import build_preset

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiling", help="exact tiled decode: accuracy vs untiled/diffusers, peak RSS at a big size")
    p.add_argument("--size", type=int, default=1024, help="image side for the accuracy comparison (0: skip)")
    p.add_argument("--big", type=int, default=2048, help="image side for the memory measurement (0: skip)")
    p.add_argument("--preset", default="sd")
    p.add_argument("--skip-untiled", action="store_true", help="do not measure the untiled peak RSS")
    p.set_defaults(func=cmd_tiling)

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
