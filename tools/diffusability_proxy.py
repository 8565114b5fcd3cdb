"""A diffusion proxy of a VAE's latent space: how fast a small latent diffusion model learns it (issue 36).

    python tools/diffusability_proxy.py DATA OUT --model sd-vae-a --model runs/ft/final [--resolution 64]
        [--steps 2000] [--seeds 0,1] [--preset small] [--batch-size 64] [--held-out 200]

For each model: encode DATA once (``sdvae encode-dataset``, centre crops at ``--resolution``, posterior mean and
log-variance) into ``OUT/<model>/latents``, then for each seed train the latent UNet of
``tools/train_latent_diffusion.py`` for the same seeded budget on it and read its held-out denoising loss (fixed
noise and timesteps, rows kept out of training; the noise-prediction MSE on the *scaled* latents, so the models are
compared at unit scale). Same data, budget and seeds for every model: the held-out loss at the end is the proxy
(lower: a latent space the diffusion model learns faster), its spread over seeds the noise of the figure.

Writes ``OUT/proxy.json`` (per model: each seed's final held-out loss and curve, the mean, the spread = max − min,
the std) and ``OUT/proxy.png`` (held-out loss against steps, one colour per model, one line per seed), and
prints a markdown table. Every step resumes: run the same command again after a kill.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_latent_diffusion, when run as a script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="image source (folder, shards, dataset) encoded by every model")
    p.add_argument("out", help="run folder")
    p.add_argument("--model", action="append", required=True, help="a VAE reference (repeat for each model)")
    p.add_argument("--resolution", type=int, default=64, help="centre-crop side of the encoded images")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each diffusion run (the budget)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (>= 2 to measure the spread)")
    p.add_argument("--preset", default="small", help="UNet preset of tools/train_latent_diffusion.py")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--held-out", type=int, default=200, help="rows kept out of training for the held-out loss")
    p.add_argument("--dtype", default="fp32", help="encode-dataset precision (fp32: the same latents on any CPU)")
    return p.parse_args(argv)


def slug(model: str) -> str:
    """A folder name for a model reference."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def summarise(finals: list[float]) -> dict[str, float]:
    """Mean, spread (max − min) and population std of the seeds' final held-out losses."""
    return {"mean": statistics.fmean(finals), "spread": max(finals) - min(finals),
            "std": statistics.pstdev(finals) if len(finals) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import train_latent_diffusion

    from sdvae.atomic import write_json
    from sdvae.latents.export import EncodeOptions, run_encode

    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    result: dict[str, Any] = {"data": args.data, "resolution": args.resolution, "steps": args.steps, "seeds": seeds,
                              "preset": args.preset, "batch_size": args.batch_size, "held_out": args.held_out,
                              "loss": "noise-prediction MSE on scaled latents, held-out rows, fixed noise and "
                                      "timesteps (tools/train_latent_diffusion.py)", "models": {}}
    for model in args.model:
        latents = out / slug(model) / "latents"
        run_encode(EncodeOptions(src=args.data, out=str(latents), model=model, resolution=args.resolution,
                                 crop="center", dtype=args.dtype, progress=False))
        runs = {}
        for seed in seeds:
            report = train_latent_diffusion.main([
                str(latents), str(out / slug(model) / f"seed-{seed}"), "--preset", args.preset, "--steps",
                str(args.steps), "--batch-size", str(args.batch_size), "--held-out", str(args.held_out), "--seed",
                str(seed), "--save-every", str(max(1, args.steps // 10)), "--num-samples", "16", "--num-stats", "64"])
            runs[str(seed)] = {"final": report["held_out_loss"]["end"], "curve": report["held_out_curve"]}
        result["models"][model] = {"runs": runs, **summarise([r["final"] for r in runs.values()])}
    write_json(out / "proxy.json", result)
    _plot(result, out / "proxy.png")
    print("| model | held-out loss (mean) | spread over seeds | std |\n|---|---:|---:|---:|")
    for model, r in result["models"].items():
        print(f"| {model} | {r['mean']:.5f} | {r['spread']:.5f} | {r['std']:.5f} |")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdvae.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, (model, r) in enumerate(result["models"].items()):
        for i, run in enumerate(r["runs"].values()):
            steps, losses = zip(*run["curve"], strict=True)
            ax.plot(steps, losses, "o-", color=f"C{c}", ms=3, alpha=0.8, label=model if i == 0 else None)
    ax.set(xlabel="diffusion training step", ylabel="held-out noise-prediction MSE", yscale="log",
           title=f"diffusion proxy: {result['steps']} steps, seeds {result['seeds']}")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
    sys.exit(0)
