"""Aspect-ratio buckets for ``encode-dataset --buckets``: the bucket sets, the assignment, the crop.

A bucket set is a list of (height, width) sizes of about the same area, covering aspect ratios
(width / height) from 1:4 to 4:1. Each image goes to the bucket whose aspect ratio is nearest its own
*in log space* (so 2:1 and 1:2 are equally far from 1:1), is resized to cover the bucket with its
aspect ratio kept, and is center- or randomly cropped to it. A diffusion trainer then batches images
of one bucket together (:class:`sdvae.latents.bucket_sampler.BucketBatchSampler`), and the SDXL
micro-conditioning (original size, crop box, target size) comes with every row.

Sets (:func:`bucket_set`):

* ``--buckets N`` (e.g. 256, 512, 1024): area ≈ N² and sides multiples of ``step`` (by default about
  N/16, SDXL's 64 at 1024: :func:`default_bucket_step`; it must be a multiple of the VAE's downsampling
  factor, so every latent side is whole). For every
  width ``w = step·k``, the height is the largest multiple of ``step`` with ``h·w ≤ N²`` (SDXL's rule),
  and the set is made symmetric by adding every transposed size; sizes with an aspect ratio beyond
  4:1 either way are left out. So every area lies in ``(N² − step·max_side, N²]``; the set's
  ``area_tolerance`` is the largest relative shortfall actually present.
* ``--buckets sdxl``: the 40 sizes SDXL trained on (Podell et al. 2023, appendix, "multi-aspect
  training"), area ≈ 1024², sides multiples of 64.

Assignment error: for an image with aspect ratio inside the set's range, ``|log r_image − log
r_bucket|`` is at most half the largest gap between neighbouring log aspect ratios of the set
(:attr:`BucketSet.spacing` is that largest gap); outside the range it goes to the extreme bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sdvae.errors import UserError
from sdvae.images.resize import cover_size, crop_offsets, resize_to
from sdvae.latents.flips import HFLIP

MAX_RATIO = 4.0
# SDXL's published bucket set, as (height, width): its multi-aspect training table.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


@dataclass(frozen=True)
class BucketSet:
    """A set of (height, width) buckets, sorted by aspect ratio (width / height), and how to assign to it.

    Attributes:
        name: ``"sdxl"`` or the area side as given (``"256"``).
        sizes: the buckets, (height, width), sorted by increasing width / height.
        area: the target area in pixels (N²).
        step: every side is a multiple of it.
    """

    name: str
    sizes: tuple[tuple[int, int], ...]
    area: int
    step: int
    log_ratios: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_ratios", tuple(math.log(w / h) for h, w in self.sizes))

    @property
    def spacing(self) -> float:
        """The largest gap between neighbouring log aspect ratios (the assignment error is ≤ half of it)."""
        gaps = [b - a for a, b in zip(self.log_ratios, self.log_ratios[1:], strict=False)]
        return max(gaps, default=0.0)

    @property
    def area_tolerance(self) -> float:
        """The largest relative difference between a bucket's area and the target area."""
        return max(abs(h * w - self.area) / self.area for h, w in self.sizes)

    def assign(self, height: int, width: int) -> tuple[int, int]:
        """The bucket nearest the aspect ratio of a height×width image, in log space (ties: the first)."""
        target = math.log(width / height)
        best = min(range(len(self.sizes)), key=lambda i: (abs(self.log_ratios[i] - target), i))
        return self.sizes[best]

    def describe(self) -> dict:
        """What the metadata records about the set."""
        return {"name": self.name, "area": self.area, "step": self.step, "max_ratio": MAX_RATIO,
                "sizes": [list(s) for s in self.sizes], "spacing_log_ratio": round(self.spacing, 6),
                "area_tolerance": round(self.area_tolerance, 6),
                "assignment": "nearest aspect ratio (width/height) in log space; resize to cover, then crop"}


def default_bucket_step(side: int, factor: int) -> int:
    """The side step of ``--buckets N`` when ``--bucket-step`` is not given: about N/16 (SDXL's 64 at 1024),
    rounded to a multiple of the downsampling factor, at least the factor.

    The relative spacing of the set then stays the same at every N (largest aspect-ratio gap about 0.15
    in log space); a fixed 64 at N = 256 has nothing between 1:1 and 5:3.
    """
    return max(factor, round(side / 16 / factor) * factor)


def make_buckets(side: int, step: int = 64, max_ratio: float = MAX_RATIO) -> BucketSet:
    """The generated set of area ≈ side² (see the module docstring for the rule).

    Raises:
        UserError: a side or step that gives no bucket.
    """
    if side <= 0 or step <= 0 or side < step:
        raise UserError(f"--buckets {side}: the area side must be at least the bucket step {step}")
    area, sizes = side * side, set()
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h and 1 / max_ratio <= w / h <= max_ratio:
            sizes.update({(h, w), (w, h)})
    sizes = {(h, w) for h, w in sizes if h * w <= area}
    return BucketSet(str(side), tuple(sorted(sizes, key=lambda s: (s[1] / s[0], s[0]))), area, step)


def bucket_set(spec: str, factor: int, step: int | None = None) -> BucketSet:
    """``--buckets SPEC``: ``sdxl`` or an area side N; checked against the downsampling factor.

    Args:
        step: ``--bucket-step``; None: :func:`default_bucket_step` (ignored by ``sdxl``, whose step is 64).

    Raises:
        UserError: an unknown name, or a step that is not a multiple of ``factor``.
    """
    if step is not None and step % factor:
        raise UserError(f"--bucket-step {step} is not a multiple of the downsampling factor {factor}")
    if spec == "sdxl":
        if 64 % factor:
            raise UserError(f"--buckets sdxl has sides that are multiples of 64, not of the factor {factor}")
        sizes = tuple(sorted(SDXL_BUCKETS, key=lambda s: (s[1] / s[0], s[0])))
        return BucketSet("sdxl", sizes, 1024 * 1024, 64)
    try:
        side = int(spec)
    except ValueError:
        raise UserError(f"--buckets must be sdxl or an area side such as 256 or 1024, got {spec!r}") from None
    return make_buckets(side, default_bucket_step(side, factor) if step is None else step)


def bucket_options(buckets: str | None, step: int | None, hflip: str, resolution: int, crop: str,
                   factor: int) -> BucketSet | None:
    """Check encode-dataset's ``--buckets``/``--bucket-step``/``--hflip`` against its other options.

    Returns:
        The bucket set, or None without ``--buckets``.

    Raises:
        UserError: an unknown ``--hflip``, ``--buckets`` with ``--resolution`` or ``--crop none``, or a bad set.
    """
    if hflip not in HFLIP:
        raise UserError(f"--hflip must be one of {', '.join(HFLIP)}, got {hflip!r}")
    if not buckets:
        return None
    if resolution or crop == "none":
        raise UserError("--buckets sets the size of every image: leave out --resolution and --crop none")
    return bucket_set(buckets, factor, step)


def variant_identity(buckets: BucketSet | None, hflip: str) -> dict:
    """The encode arguments of buckets and flips (only those in use, so older outputs still resume)."""
    out: dict = {}
    if buckets is not None:
        out.update(buckets=buckets.name, bucket_step=buckets.step)
    if hflip != "none":
        out["hflip"] = hflip
    return out


def variant_meta(meta: dict, buckets: BucketSet | None, hflip: str) -> dict:
    """The dataset metadata with ``hflip`` and, with buckets, the set and the bucketed preprocessing."""
    meta = {**meta, "hflip": hflip}
    if buckets is not None:
        meta["buckets"] = buckets.describe()
        meta["preprocessing"] = {**meta["preprocessing"], "resize": "to cover the row's bucket (nearest aspect "
                                 "ratio in log space), bicubic, antialiased, clamped to [-1,1]; then cropped to it",
                                 "crop_size": "the row's bucket [H, W]"}
    return meta


def crop_to_bucket(image: torch.Tensor, bucket: Sequence[int], crop: str,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """Resize an image to cover ``bucket`` = (H, W) (aspect kept), then crop it to exactly (H, W).

    Args:
        image: (C,h,w) float in [-1,1].
        bucket: the (H, W) bucket (see :meth:`BucketSet.assign`).
        crop: ``center`` or ``random`` (offsets drawn from ``generator``).

    Returns:
        (pixels (C,H,W) float32, resized size [h', w'], crop box [top, left, H, W] in the resized image).
    """
    bh, bw = int(bucket[0]), int(bucket[1])
    rh, rw = cover_size(*image.shape[-2:], (bh, bw))
    if (rh, rw) != tuple(image.shape[-2:]):
        image = resize_to(image, (rh, rw))
    top, left = crop_offsets(rh, rw, (bh, bw), random=crop == "random", generator=generator)
    pixels = image[:, top:top + bh, left:left + bw].float().contiguous()
    return pixels, [rh, rw], [top, left, bh, bw]
