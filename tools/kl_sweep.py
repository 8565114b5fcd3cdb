#!/usr/bin/env python
"""KL-weight sweep: what the KL term buys and costs, as one plot, one grid of prior samples and a table.

    python tools/kl_sweep.py --data ../shared/data/train/tiny-imagenet-200 --eval-data ../shared/data/kodak
    python tools/kl_sweep.py --weights 1e-6,1 --train.steps=100 --data DIR --eval-data DIR --limit 8

For each weight W (``--weights``, default 1e-6,1e-4,1e-2,1) this trains one VAE with
``tools/train.py CONFIG --loss.kl_weight=W --train.out=OUT/kl-W --data.train=DATA [overrides]`` in a
subprocess, then evaluates ``OUT/kl-W/final`` with the library (:func:`sdvae.eval.engine.evaluate_source`,
the measurement behind ``sdvae eval``) and decodes prior samples z ~ N(0, I) in the VAE's own latent
space (:func:`sdvae.eval.latent_space.sample_images` with ``space="vae"``: the prior the KL term pulls the
posteriors towards, so what it generates is the question the sweep asks). Into ``--docs`` it writes

* ``kl_sweep.png``: PSNR (dB, left) and KL rate (bits/dim, log, right) against the weight (log);
* ``prior_samples.png``: one labelled row of samples per weight (the same z for every row);
* ``kl_sweep.json``: every figure, the exact command line and the protocol;
* ``README.md``: the table, the command and both images.

The rate is the closed-form KL(q(z|x) ‖ N(0, I)) of the ELBO report in bits per image subpixel (the
training loss adds ``kl_weight`` times this KL in nats per subpixel to the per-subpixel MSE, see
:mod:`sdvae.train.losses`). Resuming: a run whose ``final/`` exists is not trained again and a killed run
resumes from its checkpoints (``tools/train.py`` does that), so after an interruption run the same
command again. The plot needs matplotlib (``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from sdvae.atomic import atomic_file
from sdvae.device import resolve_device
from sdvae.errors import UserError
from sdvae.train.config import RunConfig, config_to_dict, load_config, parse_overrides

TOOLS = Path(__file__).resolve().parent
TRAIN = TOOLS / "train.py"
DEFAULT_CONFIG = TOOLS.parent / "configs" / "kl-sweep.yaml"
DEFAULT_WEIGHTS = "1e-6,1e-4,1e-2,1"
FORMAT = "sdvae-kl-sweep/1"
# Set by the sweep for every run; an override of one of them would silently break the sweep.
SWEPT_KEYS = ("loss.kl_weight", "train.out", "data.train")
RATE_DEFINITION = ("closed-form KL(q(z|x) || N(0, I)) over the unscaled latent, divided by 3·H·W·ln 2 "
                   "(bits per image subpixel), mean over the evaluated images")


def weight_label(weight: float) -> str:
    """The shortest exact spelling of a weight, used in run folder names and labels.

    ``1e-06`` → ``1e-6``, ``0.0001`` → ``1e-4``, ``0.01`` → ``1e-2``, ``1.0`` → ``1``, ``0.5`` → ``0.5``;
    ``float(weight_label(w)) == w`` always, so one weight always maps to one folder however it was typed.

    Args:
        weight: a finite float.

    Returns:
        The plain decimal or the ``MeN`` form, whichever is shorter (``MeN`` on a tie, the way sweeps
        are usually written).
    """
    exact = Decimal(repr(float(weight))).normalize()  # repr: the shortest string that reads back as `weight`
    digits = "".join(map(str, exact.as_tuple().digits))
    mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    scientific = f"{'-' if exact.is_signed() else ''}{mantissa}e{exact.adjusted()}"
    plain = format(exact, "f")
    return plain if len(plain) < len(scientific) else scientific


def parse_weights(text: str) -> list[float]:
    """Parse ``--weights``: comma-separated positive numbers, returned in increasing order.

    Raises:
        UserError: an empty list or item, something that is not a number, a weight ≤ 0 or not finite
            (the plot's x axis is logarithmic), or the same weight twice (spelled either way).
    """
    weights: list[float] = []
    for item in text.split(","):
        try:
            weight = float(item.strip())
        except ValueError:
            raise UserError(f"--weights: {item.strip()!r} is not a number (expected e.g. {DEFAULT_WEIGHTS})") from None
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"--weights: {item.strip()!r} must be a finite number > 0 "
                            "(the plot's x axis is logarithmic)")
        if weight in weights:
            raise UserError(f"--weights: {weight_label(weight)} is given twice")
        weights.append(weight)
    return sorted(weights)


def run_dir(out: Path, weight: float) -> Path:
    """The training run folder of one weight: ``OUT/kl-<weight_label>`` (e.g. ``runs/kl-sweep/kl-1e-6``)."""
    return out / f"kl-{weight_label(weight)}"


def run_overrides(weight: float, run: Path, data: str, overrides: list[str]) -> list[str]:
    """The dotted overrides ``tools/train.py`` gets for one weight (the sweep's three, then the user's)."""
    return [f"--loss.kl_weight={weight_label(weight)}", f"--train.out={run}", f"--data.train={data}", *overrides]


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides of the keys the sweep sets itself (``--loss.kl_weight`` is ``--weights``' job).

    Raises:
        UserError: a malformed override or one of :data:`SWEPT_KEYS`.
    """
    hint = {"loss.kl_weight": "--weights", "train.out": "--out", "data.train": "--data"}
    for key in _dotted(parse_overrides(overrides)):
        if key in SWEPT_KEYS:
            raise UserError(f"--{key} is set by the sweep for every run; use {hint[key]} instead")


def check_run_folder(run: Path, cfg: RunConfig) -> None:
    """Refuse to resume or reuse a run folder that was trained with another configuration.

    ``tools/train.py`` resumes from whatever checkpoint it finds, and a finished run is skipped, so a
    changed config or override would otherwise mix two recipes into one figure without a word.

    Raises:
        UserError: ``run/config.yaml`` differs from ``cfg`` in any key but ``train.out`` (keys ``cfg`` leaves
            to the launcher, null, match whatever was resolved).
    """
    recorded = run / "config.yaml"
    if not recorded.is_file():
        return
    old = _dotted(yaml.safe_load(recorded.read_text()) or {})
    new = _dotted(config_to_dict(cfg))
    # config.yaml records launcher-resolved values (train.mixed_precision/grad_accum/num_processes) where the
    # config leaves them null, and lacks keys added since it was written: neither is a different recipe.
    changed = [k for k in sorted(old.keys() & new.keys())
               if k != "train.out" and new[k] is not None and old[k] != new[k]]
    if changed:
        key = changed[0]
        raise UserError(f"{run} was trained with {key}={old.get(key)!r}, this sweep asks for {new.get(key)!r} "
                        f"({len(changed)} key(s) differ); remove the folder or pass another --out")


def shown(path: str | Path) -> Path:
    """``path`` relative to the current folder when it lies inside it (as a user would type it), else as given."""
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(Path.cwd())
    return Path(path)


def display_command(argv: list[str], script: str | Path) -> str:
    """A command line as a user would type it: ``python SCRIPT ARGS`` with :func:`shown` of the script."""
    return shlex.join(["python", str(shown(script)), *argv])


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Write the trade-off plot: PSNR (left axis) and KL rate (right axis, log) against the KL weight (log).

    Args:
        rows: one :func:`summary_row` per weight, in increasing weight.
        path: PNG destination (written atomically).
        title: the plot title (what was trained and evaluated).

    Raises:
        UserError: matplotlib is not installed.
    """
    try:  # an optional extra: only this plot needs it
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the plot needs matplotlib: pip install -e '.[docs]'") from None

    weights = [r["kl_weight"] for r in rows]
    # Figure() rather than pyplot: no global state and no GUI backend, so it works headless.
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    left = fig.add_subplot()
    left.set_xscale("log")
    (psnr_line,) = left.plot(weights, [r["psnr_db"] for r in rows], "o-", color="tab:blue", label="PSNR")
    left.set_xlabel("KL weight (loss.kl_weight)")
    left.set_ylabel("PSNR (dB)", color="tab:blue")
    left.tick_params(axis="y", colors="tab:blue")
    left.grid(True, which="major", alpha=0.3)
    right = left.twinx()
    rates = [r["kl_bpd"] for r in rows]
    (rate_line,) = right.plot(weights, rates, "s--", color="tab:red", label="KL rate")
    if all(rate > 0 for rate in rates):  # a collapsed posterior can give exactly 0, which a log axis cannot show
        right.set_yscale("log")
    right.set_ylabel("KL rate (bits/dim)", color="tab:red")
    right.tick_params(axis="y", which="both", colors="tab:red")
    left.legend(handles=[psnr_line, rate_line], loc="lower left")
    left.set_title(title, fontsize=9)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def summary_row(weight: float, run: Path, report: dict[str, Any], train_metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures of one weight, taken from its :func:`~sdvae.eval.engine.evaluate_source` report."""
    metrics, elbo = report["metrics"], report["metrics"]["elbo"]
    return {
        "kl_weight": weight, "label": weight_label(weight), "run": str(run),
        "psnr_db": metrics["psnr"]["mean"], "psnr_std": metrics["psnr"]["std"],
        "ssim": metrics["ssim"]["mean"],
        "kl_bpd": elbo["kl_closed_form_bpd"]["mean"],  # the plotted rate
        "kl_mc_bpd": elbo["rate_bpd"]["mean"],  # the Monte-Carlo KL inside the ELBO (same expectation)
        "distortion_bpd": elbo["distortion_bpd"]["mean"],
        "elbo_bpd": elbo["elbo_bpd"]["mean"], "iw_bpd": elbo["iw_bpd"]["mean"],
        "sigma": elbo["sigma"], "images": report["data"]["evaluated"],
        "train_seconds": train_metrics.get("train_seconds"),
    }


def readme_text(rows: list[dict[str, Any]], command: str, trained: str, evaluated: str, sampled: str) -> str:
    """The docs folder's README: what was run, the table, both images, the command."""
    table = ["| KL weight | PSNR (dB) | KL (bits/dim) | ELBO (bits/dim) |", "| ---: | ---: | ---: | ---: |"]
    table += [f"| {r['label']} | {r['psnr_db']:.2f} | {r['kl_bpd']:.3g} | {r['elbo_bpd']:.3f} |" for r in rows]
    return "\n".join([
        "# KL-weight sweep",
        "",
        f"What the KL weight buys and costs: {trained}. Evaluated on {evaluated}.",
        "",
        "![PSNR and KL rate against the KL weight](kl_sweep.png)",
        "",
        *table,
        "",
        "PSNR: the posterior-mean reconstruction, rounded to 8 bits, mean over images. KL: the closed-form "
        "KL(q(z|x) ‖ N(0, I)) in bits per image subpixel (3·H·W), the rate of the ELBO. ELBO: the negative "
        "ELBO in bits/dim under a discretized Gaussian decoder whose σ is fitted per model "
        "(see `sdvae/eval/elbo.py`): distortion + rate, lower is better.",
        "",
        f"Prior samples: {sampled}.",
        "",
        "![Prior samples, one row per KL weight](prior_samples.png)",
        "",
        "Made with (from the repository root; each run is resumable, run it again after an interruption):",
        "",
        "```bash",
        command,
        "```",
        "",
        "Every figure, each training command and the full protocol: [kl_sweep.json](kl_sweep.json).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse) one run per KL weight, evaluate each, and write the figures into ``--docs``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description="KL-weight sweep: train one VAE per weight, plot PSNR and KL rate, decode prior samples.",
        epilog="Any other --section.key=value is passed to tools/train.py (e.g. --train.steps=600).",
        allow_abbrev=False)  # so a mistyped option is an unknown override, not a silent prefix match
    parser.add_argument("--config", default=str(shown(DEFAULT_CONFIG)),
                        help="base training config (default: %(default)s)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="comma-separated KL weights (default: %(default)s)")
    parser.add_argument("--data", default=None, help="training images (default: the config's data.train)")
    parser.add_argument("--eval-data", required=True, help="images to evaluate on (folder, save_to_disk, parquet)")
    parser.add_argument("--eval-resolution", type=int, default=256,
                        help="shorter side resized to this, then a center crop (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--out", default="runs/kl-sweep",
                        help="training runs go to OUT/kl-WEIGHT (default: %(default)s)")
    parser.add_argument("--docs", default="docs/kl-sweep", help="where the figures go (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=8, help="prior samples per weight (default: %(default)s)")
    parser.add_argument("--sample-size", type=int, default=128,
                        help="prior sample side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ELBO's posterior draws and of the prior "
                        "samples; training seeds are the config's train.seed (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    command = display_command(argv, __file__)

    # --- check everything that can be checked before the first (long) training run -------------
    # Imported here, not at the top, so --help and the unit tests of the helpers above stay instant.
    from diffusers.utils import logging as diffusers_logging

    from sdvae.codec.codec import Codec
    from sdvae.eval.engine import EvalSettings, evaluate_source
    from sdvae.eval.latent_space import sample_images
    from sdvae.eval.report import report_json
    from sdvae.images.compose import labelled_rows
    from sdvae.images.sources import open_source
    from sdvae.images.write import save_image
    from sdvae.model.info import downsample_factor
    from sdvae.model.load import load_vae

    diffusers_logging.set_verbosity_error()  # as `sdvae`: its dtype/hub chatter would bury the sweep's progress

    weights = parse_weights(args.weights)
    check_overrides(overrides)
    config, out, docs = Path(args.config), Path(args.out), Path(args.docs)
    base = load_config(config, overrides)
    data = args.data or base.data.train
    if not data:
        raise UserError(f"--data is required: {config} has no data.train")
    if importlib.util.find_spec("matplotlib") is None:  # fail now, not after an hour of training
        raise UserError("the plot needs matplotlib: pip install -e '.[docs]'")
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    factor = downsample_factor(load_vae(base.model.init))
    if args.sample_size < factor or args.sample_size % factor:
        raise UserError(f"--sample-size {args.sample_size} must be a positive multiple of the model's "
                        f"downsampling factor {factor}")
    # LPIPS and rFID are off: the trade-off is PSNR against rate, and their weights may not be on disk.
    settings = EvalSettings(resolution=args.eval_resolution, center_crop=True, limit=args.limit, seed=args.seed,
                            lpips=False, fid=False)
    settings.check()
    eval_source = open_source(args.eval_data)
    for weight in weights:  # also validates every run's full override list before anything is trained
        run = run_dir(out, weight)
        check_run_folder(run, load_config(config, run_overrides(weight, run, data, overrides)))
    device = str(resolve_device())

    # --- one run per weight: train (or reuse), evaluate, sample -----------------------------------
    rows, runs, sample_rows, protocol = [], [], [], None
    for i, weight in enumerate(weights, 1):
        run, label = run_dir(out, weight), weight_label(weight)
        train_args = [str(config), *run_overrides(weight, run, data, overrides)]
        if (run / "final").is_dir():  # written atomically at the very end of a run: its presence means done
            print(f"[{i}/{len(weights)}] kl_weight {label}: {run}/final exists, not training again", flush=True)
        else:
            print(f"[{i}/{len(weights)}] kl_weight {label}: training into {run}", flush=True)
            # A subprocess rather than an import: tools/train.py owns its process (accelerate, RNG state,
            # exit checks), and the run is exactly the one its command line, recorded below, reproduces.
            done = subprocess.run([sys.executable, str(TRAIN), *train_args], check=False)
            if done.returncode != 0:
                raise UserError(f"training {run} failed (exit code {done.returncode}, output above); "
                                "run the same command again to resume it")
        metrics_file = run / "metrics.json"
        train_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}

        print(f"[{i}/{len(weights)}] kl_weight {label}: evaluating {run}/final on {args.eval_data}", flush=True)
        codec = Codec(load_vae(run / "final"), device=device)
        report = evaluate_source(codec, eval_source, settings, model_ref=str(run / "final"))
        # The same seed for every weight: each row decodes the same z, so rows differ only by the model.
        samples = sample_images(codec, args.samples, (args.sample_size, args.sample_size), seed=args.seed,
                                space="vae")
        sample_rows.append((f"KL weight {label}", samples))
        row = summary_row(weight, run, report, train_metrics)
        print(f"    PSNR {row['psnr_db']:.2f} dB, KL {row['kl_bpd']:.4g} bits/dim, ELBO {row['elbo_bpd']:.4f} "
              f"bits/dim ({row['images']} images)", flush=True)
        run_protocol = report.pop("protocol")
        protocol = protocol or run_protocol  # the same settings for every run: recorded once
        rows.append(row)
        runs.append({"kl_weight": weight, "run": str(run), "train_command": display_command(train_args, TRAIN),
                     "train_metrics": train_metrics, "eval": report})

    # --- the docs folder ---------------------------------------------------------------------------
    trained = (f"{len(weights)} `{base.model.init}` VAEs identical but for `loss.kl_weight`, each trained "
               f"{base.train.steps} steps × {base.train.batch_size} {base.data.resolution}² crops of `{data}` "
               f"({config.name}, {base.loss.recon.upper()})")
    evaluated = (f"{rows[0]['images']} images of `{args.eval_data}` ({settings.describe_crop()}), "
                 f"ELBO σ fitted per model, posterior draws seed {args.seed}")
    sampled = (f"{args.samples} draws z ~ N(0, I) in each VAE's own (unscaled) latent space, the prior of the KL "
               f"term, decoded at {args.sample_size}²; seed {args.seed}, the same z in every row")
    resolved = config_to_dict(base)
    resolved["loss"]["kl_weight"] = "swept: see weights"
    resolved["train"]["out"] = f"{out}/kl-WEIGHT"
    resolved["data"]["train"] = data
    docs.mkdir(parents=True, exist_ok=True)
    save_image(labelled_rows(sample_rows), docs / "prior_samples.png")
    plot_tradeoff(rows, docs / "kl_sweep.png", f"{base.model.init} preset, {base.train.steps} steps; "
                  f"{rows[0]['images']} images of {Path(args.eval_data).name} at {args.eval_resolution}²")
    summary = {
        "format": FORMAT,
        "command": command,
        "protocol": {
            "training": {"config": str(config), "swept": "loss.kl_weight", "set_per_run": list(SWEPT_KEYS),
                         "overrides": overrides, "data": data, "description": trained, "resolved_config": resolved},
            "rate": RATE_DEFINITION,
            "evaluation": {"data": args.eval_data, "description": evaluated, **(protocol or {})},
            "samples": {"n": args.samples, "size": args.sample_size, "seed": args.seed, "space": "vae",
                        "description": sampled},
        },
        "weights": [r["kl_weight"] for r in rows],
        "table": rows,
        "runs": runs,
        "files": {"plot": "kl_sweep.png", "samples": "prior_samples.png", "readme": "README.md"},
    }
    with atomic_file(docs / "kl_sweep.json") as tmp:
        tmp.write_text(report_json(summary, indent=2) + "\n", encoding="utf-8")
    with atomic_file(docs / "README.md") as tmp:
        tmp.write_text(readme_text(rows, command, trained, evaluated, sampled), encoding="utf-8")
    print(f"wrote {docs}/kl_sweep.png, prior_samples.png, kl_sweep.json, README.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"kl_sweep.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kl_sweep.py: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
