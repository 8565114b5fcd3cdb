"""Results as a markdown table and JSON, and the one PSNR every table uses."""

from __future__ import annotations

import json
import math
from pathlib import Path


def fmt(value, digits: int = 4) -> str:
    """A table cell: None/NaN as –, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows``: ``columns`` are (key, header) pairs; a missing key is –."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | str, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, replaced atomically (NaN written as null)."""
    from sdvae.atomic import write_json as write_json_atomic

    write_json_atomic(path, _finite(json.loads(json.dumps(payload, default=str))))


def _finite(value):
    """``value`` with NaN/inf floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def psnr(out, ref) -> float:
    """PSNR in dB between two images in [-1, 1] after 8-bit quantisation (what a saved PNG would hold)."""
    a, b = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 for t in (out, ref))
    mse = float((a.round() - b.round()).square().mean())
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")


def percent(fraction: float | None) -> str:
    return f"{100 * fraction:.3g}%" if fraction is not None else "–"
