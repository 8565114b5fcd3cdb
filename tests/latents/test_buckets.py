"""Aspect-ratio buckets (sdvae.latents.buckets) and the same-shape batch sampler (sdvae.latents.bucket_sampler)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sdvae.errors import UserError
from sdvae.latents.bucket_sampler import BucketBatchSampler
from sdvae.latents.buckets import SDXL_BUCKETS, bucket_set, crop_to_bucket, default_bucket_step, make_buckets
from sdvae.seeding import seeded_generator

# --- bucket sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "step"), [("256", 64), ("512", 64), ("1024", 64), ("256", 32), ("64", 16),
                                            ("sdxl", 64)])
def test_bucket_set_rules(spec: str, step: int) -> None:
    buckets = bucket_set(spec, factor=8, step=step)
    assert len(buckets.sizes) == len(set(buckets.sizes)) >= 3
    for h, w in buckets.sizes:
        assert h % buckets.step == 0 and w % buckets.step == 0 and h % 8 == 0 and w % 8 == 0
        assert 1 / 4 - 1e-9 <= w / h <= 4 + 1e-9
        # area within the set's tolerance; generated sets follow their rule: (N² - step·max_side, N²]
        assert abs(h * w - buckets.area) <= buckets.area_tolerance * buckets.area + 1e-6
        assert buckets.area - buckets.step * max(h, w) < h * w <= buckets.area or spec == "sdxl"
    ratios = [w / h for h, w in buckets.sizes]
    assert ratios == sorted(ratios) and min(ratios) == pytest.approx(1 / 4) and max(ratios) == pytest.approx(4)
    assert (buckets.area ** 0.5, buckets.area ** 0.5) in {(float(h), float(w)) for h, w in buckets.sizes}
    assert {(w, h) for h, w in buckets.sizes} == set(buckets.sizes) or spec == "sdxl"  # generated sets: symmetric


@pytest.mark.parametrize(("side", "factor", "step"), [(256, 8, 16), (512, 8, 32), (768, 8, 48), (1024, 8, 64),
                                                     (64, 8, 8), (32, 8, 8), (1024, 16, 64), (256, 16, 16),
                                                     (384, 16, 32)])
def test_default_step_is_about_a_sixteenth_of_the_side(side: int, factor: int, step: int) -> None:
    assert default_bucket_step(side, factor) == step
    assert bucket_set(str(side), factor=factor).step == step


def test_default_step_keeps_a_4_3_photo_near_its_aspect_ratio_at_every_size() -> None:
    for side in (256, 512, 1024):
        bh, bw = bucket_set(str(side), factor=8).assign(600, 800)
        assert abs(math.log(bw / bh) - math.log(4 / 3)) < 0.05  # a fixed step of 64 at 256 gave 5:3 (+25 %)
        assert bucket_set(str(side), factor=8).spacing < 0.16
    assert bucket_set("1024", factor=8).sizes == bucket_set("1024", factor=8, step=64).sizes  # as before at 1024


def test_sdxl_set_is_the_published_one() -> None:
    buckets = bucket_set("sdxl", factor=8)
    assert len(buckets.sizes) == 40 and set(buckets.sizes) == set(SDXL_BUCKETS)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                 (1536, 640), (640, 1536), (512, 2048), (2048, 512)]:
        assert size in buckets.sizes
    assert buckets.area_tolerance < 0.1


def test_bucket_set_errors() -> None:
    with pytest.raises(UserError, match="multiple of the downsampling factor"):
        bucket_set("256", factor=8, step=60)
    with pytest.raises(UserError, match="sdxl or an area side"):
        bucket_set("huge", factor=8)
    with pytest.raises(UserError, match="at least the bucket step"):
        make_buckets(32, step=64)


@pytest.mark.parametrize("spec", ["256", "1024", "sdxl"])
def test_assignment_is_nearest_in_log_space_within_half_the_spacing(spec: str) -> None:
    buckets = bucket_set(spec, factor=8)
    rng = random.Random(0)
    for _ in range(2000):
        ratio = math.exp(rng.uniform(math.log(1 / 4), math.log(4)))  # width / height, inside the set's range
        h = rng.randint(16, 3000)
        w = max(1, round(h * ratio))
        bh, bw = buckets.assign(h, w)
        error = abs(math.log(bw / bh) - math.log(w / h))
        assert error <= min(abs(math.log(bw2 / bh2) - math.log(w / h)) for bh2, bw2 in buckets.sizes) + 1e-12
        assert error <= buckets.spacing / 2 + 0.01  # + the rounding of w to whole pixels
    # Beyond the range: the extreme buckets; square images: the square bucket.
    assert buckets.assign(100, 1000) == max(buckets.sizes, key=lambda s: s[1] / s[0])
    assert buckets.assign(1000, 100) == min(buckets.sizes, key=lambda s: s[1] / s[0])
    assert buckets.assign(500, 500)[0] == buckets.assign(500, 500)[1]


def test_crop_to_bucket_covers_then_crops() -> None:
    image = torch.rand(3, 50, 130) * 2 - 1
    for crop in ("center", "random"):
        pixels, resized, box = crop_to_bucket(image, (64, 128), crop, seeded_generator(0, "c", 1))
        assert pixels.shape == (3, 64, 128) and box[2:] == [64, 128]
        assert resized[0] >= 64 and resized[1] >= 128 and (resized[0] == 64 or resized[1] == 128)
        assert abs(resized[1] / resized[0] - 130 / 50) < 0.05  # aspect kept
        assert 0 <= box[0] <= resized[0] - 64 and 0 <= box[1] <= resized[1] - 128
    a = crop_to_bucket(image, (64, 64), "random", seeded_generator(0, "c", 1))
    b = crop_to_bucket(image, (64, 64), "random", seeded_generator(0, "c", 1))
    assert a[2] == b[2] and torch.equal(a[0], b[0])  # seeded: a pure function of the generator's seed
    assert crop_to_bucket(image, (64, 64), "center")[2][1] == (a[1][1] - 64) // 2


# --- the batch sampler ---------------------------------------------------------------------------

SHAPES = [(4, 8, 8)] * 37 + [(4, 4, 16)] * 23 + [(4, 16, 4)] * 11 + [(4, 6, 10)] * 3  # 74 rows, 4 buckets


def _rows(batches):
    return [i for b in batches for i in b]


def test_batches_have_one_shape_and_cover_each_bucket() -> None:
    sampler = BucketBatchSampler(SHAPES, 5, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 + 4 + 2  # full batches only; the 3-row bucket is unused
    assert all(len(b) == 5 and len({SHAPES[i] for i in b}) == 1 for b in batches)
    assert len(set(_rows(batches))) == len(_rows(batches))  # no row twice in an epoch
    assert sampler.unused_buckets == [(4, 6, 10)]
    # shuffled across buckets: the shapes of consecutive batches are mixed, not grouped
    order = [SHAPES[b[0]] for b in batches]
    assert order != sorted(order, key=repr) and order != sorted(order, key=repr, reverse=True)
    keep = BucketBatchSampler(SHAPES, 5, seed=3, partial="keep")
    kept = list(keep)
    assert sorted(_rows(kept)) == list(range(len(SHAPES)))  # every row, in batches of one shape
    assert all(len({SHAPES[i] for i in b}) == 1 for b in kept) and min(map(len, kept)) == 1


def test_epochs_are_seeded_and_differ() -> None:
    a, b = BucketBatchSampler(SHAPES, 5, seed=3), BucketBatchSampler(SHAPES, 5, seed=3)
    assert a.epoch_batches(0) == b.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != BucketBatchSampler(SHAPES, 5, seed=4).epoch_batches(0)
    a.set_epoch(1)
    assert list(a) == b.epoch_batches(1)
    within = [sorted(b) for b in a.epoch_batches(0)]
    assert within != [sorted(b) for b in a.epoch_batches(1)]  # rows shuffled within buckets too


@pytest.mark.parametrize("world", [2, 3])
def test_rank_sharding_disjoint_same_count(world: int) -> None:
    for partial in ("drop", "keep"):
        samplers = [BucketBatchSampler(SHAPES, 4, seed=1, rank=r, world_size=world, partial=partial)
                    for r in range(world)]
        per_rank = [s.epoch_batches(2) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0]) > 0
        rows = [set(_rows(b)) for b in per_rank]
        assert all(rows[i].isdisjoint(rows[j]) for i in range(world) for j in range(i + 1, world))
        single = BucketBatchSampler(SHAPES, 4, seed=1, partial=partial).epoch_batches(2)
        # the ranks share out the one-process epoch, batch for batch (minus the uneven tail)
        assert sorted(tuple(b) for r in per_rank for b in r) == sorted(map(tuple, single[:len(per_rank[0]) * world]))


def test_resume_mid_epoch_equals_uninterrupted() -> None:
    full = BucketBatchSampler(SHAPES, 4, seed=5, rank=1, world_size=2)
    full.set_epoch(3)
    uninterrupted = list(full)
    resumed = BucketBatchSampler(SHAPES, 4, seed=5, rank=1, world_size=2, start_batch=4)
    resumed.set_epoch(3)
    assert list(resumed) == uninterrupted[4:]
    assert list(resumed) == uninterrupted  # start_batch applies once; the next pass is the whole epoch
    # the endless stream from global step k equals the stream from 0 after k batches
    n = len(full)
    stream = BucketBatchSampler(SHAPES, 4, seed=5, rank=1, world_size=2).stream()
    first = [next(stream) for _ in range(3 * n + 2)]
    again = BucketBatchSampler(SHAPES, 4, seed=5, rank=1, world_size=2).stream(2 * n + 1)
    assert [next(again) for _ in range(n + 1)] == first[2 * n + 1:]
    assert first[3 * n][0] == 3 and first[3 * n][1] == uninterrupted[0]


def test_indices_and_errors() -> None:
    train = [i for i in range(len(SHAPES)) if i % 5]
    sampler = BucketBatchSampler(SHAPES, 4, seed=0, indices=train, partial="keep")
    assert sorted(_rows(sampler.epoch_batches(0))) == train
    with pytest.raises(UserError, match="fewer than one batch"):
        BucketBatchSampler([(4, 2, 2)] * 3, 4)
    with pytest.raises(ValueError):
        BucketBatchSampler(SHAPES, 4, rank=2, world_size=2)
