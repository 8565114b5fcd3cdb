"""Presenting an ``sdvae eval`` report: the model-card markdown row, the printed summary, strict JSON.

The report itself (a plain dict) is made by :func:`sdvae.eval.engine.evaluate_source`; this module only
formats it, so the table layout can change without touching the measurement.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sdvae.atomic import atomic_file
from sdvae.errors import UserError


def _label(ref: str) -> str:
    """A short table label: a preset/hub name as is, a folder by its name, a file with its folder's name."""
    path = Path(ref)
    if not path.exists() or not path.name:
        return ref
    return f"{path.parent.name}/{path.name}" if path.is_file() and path.parent.name else path.name


def markdown_table(report: dict[str, Any]) -> str:
    """Header, separator and one row in the style of the sd-vae-ft-mse model card's tables.

    Columns: Model, Data, Resolution, Images, rFID, PSNR (mean +/- std), SSIM (mean +/- std), LPIPS,
    ELBO (bits/dim); a metric that could not be computed is ``n/a``.
    """
    m = report["metrics"]
    p = report["protocol"]
    if p["resolution"] is None:
        res = "full"
    else:
        res = f"{p['resolution']}²" + (" center crop" if p["center_crop"] else " (shorter side)")
    rfid = f"{m['rfid']['value']:.2f}" if m["rfid"]["available"] else "n/a"
    lp = f"{m['lpips']['mean']:.3f} +/- {m['lpips']['std']:.3f}" if m["lpips"]["available"] else "n/a"
    elbo = m["elbo"]
    row = [_label(report["model"]["ref"]), _label(report["data"]["ref"]), res,
           f"{report['data']['evaluated']:,}", rfid,
           f"{m['psnr']['mean']:.1f} +/- {m['psnr']['std']:.1f}", f"{m['ssim']['mean']:.2f} +/- {m['ssim']['std']:.2f}",
           lp, f"{elbo['elbo_bpd']['mean']:.3f}"]
    header = ["Model", "Data", "Resolution", "Images", "rFID", "PSNR", "SSIM", "LPIPS", "ELBO (bits/dim)"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:"]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in (header, align, row))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The human-readable summary ``sdvae eval`` prints."""
    m, d, p = report["metrics"], report["data"], report["protocol"]
    model = report["model"]
    lines = [
        f"model {model['ref']} (config {model['config_hash']}, f{model['downsampling_factor']}, "
        f"{model['latent_channels']} latent channels) on {d['description']}",
        f"protocol: {p['preprocessing']}; {p['dtype']} on {p['device']}"
        + (f"; {p['channels']}" if model.get("image_channels", 3) != 3 else ""),
        f"images: {d['evaluated']:,} evaluated, {d['skipped']:,} skipped"
        + (f" (first: {d['skipped_examples'][0]['reason']})" if d["skipped"] else ""),
        f"PSNR   {m['psnr']['mean']:.2f} ± {m['psnr']['std']:.2f} dB",
        f"SSIM   {m['ssim']['mean']:.4f} ± {m['ssim']['std']:.4f}",
    ]
    if m["lpips"]["available"]:
        lines.append(f"LPIPS  {m['lpips']['mean']:.4f} ± {m['lpips']['std']:.4f} ({m['lpips']['net']})")
    else:
        lines.append(f"LPIPS  unavailable: {m['lpips']['reason']}")
    lines.append(f"rFID   {m['rfid']['value']:.3f}" if m["rfid"]["available"] else
                 f"rFID   unavailable: {m['rfid']['reason']}")
    e = m["elbo"]
    lines += [
        f"ELBO   {e['elbo_bpd']['mean']:.4f} ± {e['elbo_bpd']['std']:.4f} bits/dim = distortion "
        f"{e['distortion_bpd']['mean']:.4f} + rate {e['rate_bpd']['mean']:.4f} "
        f"(closed-form KL {e['kl_closed_form_bpd']['mean']:.4f})",
        f"IW     {e['iw_bpd']['mean']:.4f} ± {e['iw_bpd']['std']:.4f} bits/dim with K={e['iw_samples']} "
        "(an upper bound on -log2 p(x)/dim like the ELBO, never above it)",
        f"likelihood: 8-bit discretized Gaussian, sigma = {e['sigma']:.4g} on the [-1,1] scale "
        f"({e['sigma_8bit']:.3g} 8-bit levels), {e['sigma_rule']}",
    ]
    if "warning" in e:
        lines.append(f"warning: {e['warning']}")
    if "diffusability" in m:
        lines += diffusability_lines(m["diffusability"])
    lines += [f"note: {note}" for note in report["notes"]]
    return lines


def diffusability_lines(section: dict[str, Any]) -> list[str]:
    """The printed lines of the ``diffusability`` section (definitions in the report's protocol)."""
    lines = []
    spec, stats = section["spectrum"], section["statistics"]
    if spec["available"]:
        lat, img = spec["latent"]["upper_share"], spec["image"]["upper_share"]
        per_channel = " ".join(f"{c['mean']:.3f}" for c in spec["latent"]["upper_share_per_channel"])
        lines.append(f"spectrum: upper-half-band energy share, latents {lat['mean']:.3f} ± {lat['std']:.3f} "
                     f"(channels {per_channel}) vs image at the latent grid {img['mean']:.3f} ± {img['std']:.3f} "
                     f"(white noise 0.75)")
    else:
        lines.append(f"spectrum: unavailable: {spec['reason']}")
    for name, eq in section["equivariance"].items():
        lines.append(f"equivariance {name:<15}: PSNR decode(τ(z)) {eq['psnr_latent_tau']['mean']:.2f} dB, "
                     f"decode(encode(τ(x))) {eq['psnr_image_tau']['mean']:.2f} dB, gap {eq['gap']['mean']:.2f} "
                     f"± {eq['gap']['std']:.2f} dB")
    if stats["available"]:
        fmt = " ".join
        lines += [
            f"latent stats (scaled): mean {fmt(f'{v:+.3f}' for v in stats['mean'])} (spread "
            f"{stats['mean_spread']:.3f}); std {fmt(f'{v:.3f}' for v in stats['std'])} (spread "
            f"{stats['std_spread']:.3f})",
            f"latent stats (scaled): excess kurtosis {fmt(f'{v:+.2f}' for v in stats['excess_kurtosis'])}; "
            f"max |inter-channel correlation| {stats['max_abs_correlation']:.3f}",
        ]
    return lines


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def report_json(report: dict[str, Any], indent: int | None = None) -> str:
    """Strict JSON of a report: non-finite numbers (e.g. the PSNR of identical images) become null."""
    return json.dumps(_finite_or_none(report), indent=indent, ensure_ascii=False, allow_nan=False)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`report_json` (indented) to ``path`` atomically."""
    dest = Path(path)
    text = report_json(report, indent=2)
    try:
        with atomic_file(dest) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(f"{dest}: cannot write ({err.strerror or err})") from None
    return dest
