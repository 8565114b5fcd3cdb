"""encode-dataset --buckets / --hflip both, read back through LatentDataset and BucketBatchSampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import dataset_rows, encode_small, save_photo, stored_latent
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.images.sources import open_source
from sdvae.latents.bucket_sampler import BucketBatchSampler
from sdvae.latents.buckets import bucket_set, crop_to_bucket
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.flips import flipped_crop_box
from sdvae.latents.format import read_dataset_meta
from sdvae.model.build import build_preset
from sdvae.seeding import seeded_generator

# (width, height): portrait, landscape and square, some beyond 4:1
SIZES = [(96, 32), (32, 96), (48, 48), (80, 40), (40, 80), (130, 30), (30, 130), (60, 50), (50, 60), (64, 64),
         (90, 45), (45, 90)]
BUCKETS = dict(buckets="64", bucket_step=16)  # area 64x64, sides multiples of 16: 2..8 latent cells


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    for i, (w, h) in enumerate(SIZES):
        save_photo(root / f"im{i:02d}.png", w, h, seed=i)
    return root


def test_buckets_follow_aspect_ratio(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = encode_small(mixed, out, resolution=0, crop="random", **BUCKETS)
    assert summary["complete"] and summary["rows"] == len(SIZES)
    buckets = bucket_set("64", factor=8, step=16)
    source = open_source(str(mixed))
    codec = Codec(build_preset("test"))
    for row in dataset_rows(out):
        h, w = row["original_size"]
        bh, bw = row["bucket"]
        assert (h, w) == source.load(row["index"]).shape[-2:]
        assert row["shape"] == [4, bh // 8, bw // 8] and row["crop_box"][2:] == [bh, bw]
        assert (bh, bw) in buckets.sizes
        error = abs(math.log(bw / bh) - math.log(w / h))
        if 1 / 4 <= w / h <= 4:
            assert error <= buckets.spacing / 2 + 1e-9  # the set's spacing bounds the aspect-ratio error
        assert (bh < bw) == (h < w) or h == w or bh == bw  # portrait stays portrait, landscape landscape
        # the stored posterior is the encoding of the documented crop (seeded per image)
        pixels, resized, box = crop_to_bucket(source.load(row["index"]), (bh, bw), "random",
                                              seeded_generator(0, "encode-crop", row["index"]))
        assert row["resized_size"] == resized and row["crop_box"] == box
        torch.testing.assert_close(stored_latent(row, "mean"), codec.encode(pixels[None]).mean[0],
                                   atol=1e-5, rtol=1e-5)
    counts = {}
    for row in dataset_rows(out):
        key = f"{row['bucket'][0]}x{row['bucket'][1]}"
        counts[key] = counts.get(key, 0) + 1
    assert summary["buckets"] == counts and len(counts) >= 5  # the JSON summary's histogram
    meta = json.loads((out / "sdvae_latents.json").read_text())
    assert meta["bucket_histogram"] == counts and meta["buckets"]["sizes"] == [list(s) for s in buckets.sizes]

    # A loader yields only same-shape batches, covering the rows.
    data = LatentDataset(out)
    loader = DataLoader(data, batch_sampler=BucketBatchSampler(data.shapes(), 2, seed=0, partial="keep"))
    seen = []
    for batch in loader:
        assert batch["latent"].dim() == 4  # stacked: one shape per batch
        assert all(list(s) == [4, *batch["latent"].shape[-2:]] for s in [data.shapes()[0][:1] + tuple(
            batch["latent"].shape[-2:])])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(SIZES)))


def test_buckets_are_per_image_pure_two_ranks_match_one(mixed: Path, tmp_path: Path, monkeypatch) -> None:
    one = tmp_path / "one"
    encode_small(mixed, one, resolution=0, crop="random", **BUCKETS)
    two = tmp_path / "two"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        summary = encode_small(mixed, two, resolution=0, crop="random", **BUCKETS)
    assert summary["complete"]
    assert dataset_rows(one) == dataset_rows(two)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="different arguments"):  # resuming needs the same buckets
        encode_small(mixed, one, resolution=0, crop="random", buckets="64", bucket_step=32)


def test_bucket_argument_errors(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="leave out --resolution"):
        encode_small(mixed, tmp_path / "a", resolution=32, **BUCKETS)
    with pytest.raises(UserError, match="multiple of the downsampling factor"):
        encode_small(mixed, tmp_path / "b", resolution=0, buckets="64", bucket_step=12)


@pytest.mark.parametrize("store", ["mean_logvar", "sample"])
def test_hflip_copies_are_the_encoding_of_the_mirrored_crop(mixed: Path, tmp_path: Path, store: str) -> None:
    out = tmp_path / "out"
    encode_small(mixed, out, resolution=0, crop="center", hflip="both", store=store, **BUCKETS)
    source = open_source(str(mixed))
    codec = Codec(build_preset("test"))
    rows = dataset_rows(out)
    assert len(rows) == len(SIZES)  # one row per image: the copies are columns
    for row in rows[:5]:
        pixels, _, _ = crop_to_bucket(source.load(row["index"]), row["bucket"], "center")
        mirrored = codec.encode(pixels.flip(-1)[None])
        if store == "mean_logvar":
            torch.testing.assert_close(stored_latent(row, "mean_flip"), mirrored.mean[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stored_latent(row, "logvar_flip"), mirrored.logvar[0], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(stored_latent(row, "mean_flip"), stored_latent(row, "mean").flip(-1), atol=1e-3)
        else:  # the copy's draw: its own seeded noise around the mirrored posterior
            eps = torch.randn(mirrored.mean[0].shape, generator=seeded_generator(0, "encode-sample-flip", row["index"]))
            torch.testing.assert_close(stored_latent(row, "latent_flip"),
                                       mirrored.mean[0] + torch.exp(0.5 * mirrored.logvar[0]) * eps,
                                       atol=1e-5, rtol=1e-5)

    never, always = LatentDataset(out, flip="never", sample=False), LatentDataset(out, flip="always", sample=False)
    column = "mean" if store == "mean_logvar" else "latent"
    for i in range(3):
        row = rows[i]
        assert torch.equal(never.unscaled(i)[0], stored_latent(row, column))
        assert torch.equal(always.unscaled(i)[0], stored_latent(row, f"{column}_flip"))
        assert always[i]["flipped"] and not never[i]["flipped"]
        assert always[i]["crop_box"].tolist() == flipped_crop_box(row["crop_box"], row["resized_size"])
    random_flips = LatentDataset(out)
    flags = [[random_flips[i]["flipped"] for i in range(len(rows))] for random_flips.epoch in (0, 1, 2)]
    assert any(sum(f) not in (0, len(rows)) for f in flags)  # about half, drawn per (epoch, row)
    assert flags[0] == [LatentDataset(out)[i]["flipped"] for i in range(len(rows))]  # seeded


def test_cli_buckets_and_latent_stats_histogram(mixed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["encode-dataset", str(mixed), str(out), "--model", "test", "--buckets", "64", "--bucket-step",
                 "16", "--hflip", "both", "--num-workers", "0", "--no-progress", "--dtype", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["buckets"].values()) == len(SIZES)
    assert main(["latent-stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["buckets"] == summary["buckets"] and stats["rows"] == len(SIZES)
    assert main(["latent-stats", str(out)]) == 0
    assert "buckets (HxW: rows): " in capsys.readouterr().out
    assert summary["bucket_set"] == {"name": "64", "area": 64 * 64, "step": 16,
                                     "spacing_log_ratio": round(bucket_set("64", 8, 16).spacing, 6)}


def test_cli_default_bucket_step_scales_with_the_side_and_is_printed(mixed: Path, tmp_path: Path, capsys) -> None:
    assert main(["encode-dataset", str(mixed), str(tmp_path / "auto"), "--model", "test", "--buckets", "128",
                 "--num-workers", "0", "--no-progress", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "bucket set 128: sides multiples of 8, largest log aspect-ratio gap" in printed  # 128/16 = 8
    assert read_dataset_meta(tmp_path / "auto")["buckets"]["step"] == 8


def test_an_unfinished_bucketed_run_says_what_is_missing(mixed: Path, tmp_path: Path, monkeypatch) -> None:
    """Rank 0 of 2 alone: its shards are written, the other rank's are missing; the summary says how many
    (the CLI prints that count) and still describes the bucket set."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = encode_small(mixed, tmp_path / "half", resolution=0, crop="random", **BUCKETS)
    assert not summary["complete"] and summary["shards_missing"] == summary["shards_total"] // 2
    assert summary["bucket_set"]["step"] == 16
