"""The transforms τ of the equivariance measures and regularisers, on images or latents alike.

Exact box (area) resampling to 1/2 or 3/4 of each side, a 90° rotation and a horizontal flip: what
``sdvae eval --diffusability`` measures equivariance under (:mod:`sdvae.eval.diffusability`) and what the
training regularisers ``loss.equivariance`` / ``loss.scale_equivariance`` ask for
(:mod:`sdvae.train.regularisers`). All are linear and differentiable.
"""

from __future__ import annotations

import torch

TRANSFORMS = ("scale_0.5", "scale_0.75", "rotate_90", "flip_horizontal")
SCALES = {"scale_0.5": (1, 2), "scale_0.75": (3, 4)}  # factor p/q


def area_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact box-resampling weights from ``n_in`` samples to ``n_out`` along one axis.

    Output sample j covers input interval [j·n_in/n_out, (j+1)·n_in/n_out); its weight on input i is
    the overlap with [i, i+1) divided by the footprint length. Computed in integers, so weights such as
    the 3/4, 1/4, 1/2 of a 4 → 3 resize are exact.

    Returns:
        (n_out, n_in) tensor, rows summing to 1.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    # In units of 1/n_out input samples: output j spans [j·n_in, (j+1)·n_in), input i spans [i·n_out, (i+1)·n_out).
    j = torch.arange(n_out).view(-1, 1)
    i = torch.arange(n_in).view(1, -1)
    overlap = (torch.minimum((j + 1) * n_in, (i + 1) * n_out) - torch.maximum(j * n_in, i * n_out)).clamp_min(0)
    return (overlap.double() / n_in).to(dtype)


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Box-resample the last two axes to ``size`` (see :func:`area_matrix`); a mean-preserving linear map.

    Args:
        x: (..., H, W) float tensor.
        size: (H', W').

    Returns:
        (..., H', W') in x's dtype.
    """
    rows = area_matrix(x.shape[-2], size[0], x.dtype).to(x.device)
    cols = area_matrix(x.shape[-1], size[1], x.dtype).to(x.device)
    return rows @ x @ cols.T


def transform(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply τ (one of :data:`TRANSFORMS`) to images or latents alike.

    Args:
        x: (B,C,H,W); for the scales, H and W must be multiples of the factor's denominator (2 or 4).
        name: ``scale_0.5`` | ``scale_0.75`` (box resampling) | ``rotate_90`` (counter-clockwise) |
            ``flip_horizontal``.

    Returns:
        The transformed tensor: (B,C,H·p/q,W·p/q) for a scale p/q, (B,C,W,H) for the rotation.
    """
    if name == "flip_horizontal":
        return x.flip(-1)
    if name == "rotate_90":
        return torch.rot90(x, 1, (-2, -1))
    if name not in SCALES:
        raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")
    p, q = SCALES[name]
    height, width = x.shape[-2:]
    if height % q or width % q:
        raise ValueError(f"{name}: sides {height}x{width} are not multiples of {q}")
    return area_resize(x, (height * p // q, width * p // q))
