"""Image sources and training data: deterministic augmentation, resumable sharded sampling, skipping bad files."""

from __future__ import annotations

import io
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import make_photo
from sdvae.errors import UserError
from sdvae.images.resize import resize_shorter
from sdvae.images.sources import open_source
from sdvae.train.config import DataConfig
from sdvae.train.datasets import TrainDataset, ValDataset
from sdvae.train.loaders import SkipLog, SkipLoggingLoader, build_dataloaders, collate, split_validation
from sdvae.train.sampler import ResumableSampler


def _save(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_photo(width, height, seed)).convert(mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """12 small images in nested folders, varied sizes and modes, plus non-image files."""
    root = tmp_path / "imgs"
    for i in range(12):
        sub = ["", "b/", "a/deep/"][i % 3]
        mode = ["RGB", "L", "RGBA", "CMYK"][i % 4]
        ext = "jpg" if mode == "CMYK" else "png"
        _save(root / f"{sub}img{i:02d}.{ext}", 40 + i, 30 + 2 * i, seed=i, mode=mode)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "x.png", 40, 40)
    return root


def _hf_dataset(n: int = 6, column: str = "img"):
    import datasets

    images = [Image.fromarray(make_photo(36 + i, 34, seed=i)) for i in range(n)]
    features = datasets.Features({column: datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({column: images, "caption": [f"c{i}" for i in range(n)]}, features=features)


# --- sources -----------------------------------------------------------------------------------


def test_folder_source_recursive_sorted(folder: Path):
    src = open_source(str(folder))
    names = [src.name(i) for i in range(len(src))]
    assert len(src) == 12
    assert names == sorted(names)
    assert "a/deep/img02.png" in names and "notes.txt" not in names
    assert not any(n.startswith(".hidden") for n in names)
    for i in range(len(src)):  # gray, alpha and CMYK all come out as RGB in [-1,1]
        x = src.load(i)
        assert x.dtype == torch.float32 and x.shape[0] == 3 and x.min() >= -1 and x.max() <= 1
    assert "12 images" in src.describe()


def test_parquet_and_save_to_disk_sources(tmp_path: Path):
    ds = _hf_dataset(column="img")
    ds.to_parquet(str(tmp_path / "part-0.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    cache = str(tmp_path / "cache")
    for ref in [str(tmp_path / "part-0.parquet"), str(tmp_path / "*.parquet"), str(tmp_path / "saved")]:
        src = open_source(ref, image_column="img", cache_dir=cache)
        assert len(src) == 6, ref
        x = src.load(2)
        assert x.shape == (3, 34, 38), ref
        assert torch.equal(x, torch.from_numpy(make_photo(38, 34, 2)).permute(2, 0, 1).float() / 127.5 - 1)
        assert src.dataset.column_names == ["img"]  # extra columns dropped
    with pytest.raises(UserError, match=r"no column 'image'.*caption"):
        open_source(str(tmp_path / "saved"), cache_dir=cache)


def test_dataset_dict_split(tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(3), "test": _hf_dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    assert len(open_source(str(tmp_path / "dd"), "img", split="test")) == 2
    with pytest.raises(UserError, match="no split 'val'"):
        open_source(str(tmp_path / "dd"), "img", split="val")


def test_source_errors(tmp_path: Path):
    with pytest.raises(UserError, match="no such file or folder"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no image files"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no files match"):
        open_source(str(tmp_path / "*.parquet"))
    with pytest.raises(UserError, match=r"hub dataset 'someone/nothing-here'.*local") as err:
        open_source("someone/nothing-here", cache_dir=str(tmp_path / "cache"))  # offline in tests
    assert "\n" not in str(err.value)


# --- augmentation ------------------------------------------------------------------------------


def test_train_dataset_deterministic(tmp_path: Path):
    _save(tmp_path / "big" / "a.png", 80, 64)
    src = open_source(str(tmp_path / "big"))
    ds = TrainDataset(src, resolution=32, crop="random", flip=True, seed=3)
    a, b = ds[(0, 0)], TrainDataset(src, resolution=32, seed=3)[(0, 0)]
    assert a["pixels"].shape == (3, 32, 32) and a["pixels"].dtype == torch.float32 and a["index"] == 0
    assert torch.equal(a["pixels"], b["pixels"])
    crops = [ds[(epoch, 0)]["pixels"] for epoch in range(1, 5)]
    assert not all(torch.equal(a["pixels"], c) for c in crops)  # new epoch, new crop
    assert not torch.equal(a["pixels"], TrainDataset(src, resolution=32, seed=4)[(0, 0)]["pixels"])
    center = TrainDataset(src, resolution=32, crop="center", flip=False)
    assert torch.equal(center[(0, 0)]["pixels"], center[(7, 0)]["pixels"])
    assert torch.equal(center[(0, 0)]["pixels"], src.load(0)[:, 16:48, 24:56])


def test_mosaic_tiles_are_deterministic_crops_of_different_images(tmp_path: Path):
    for i in range(6):
        _save(tmp_path / "m" / f"{i}.png", 40, 36, seed=i)
    src = open_source(str(tmp_path / "m"))
    ds = TrainDataset(src, resolution=32, crop="center", flip=False, seed=1, mosaic=2)
    item = ds[(0, 3)]
    x = item["pixels"]
    assert x.shape == (3, 32, 32) and item["index"] == 3
    # Top-left tile is the keyed image's 16² center crop (40×36 → shorter side already >= 16).
    assert torch.equal(x[:, :16, :16], src.load(3)[:, 10:26, 12:28])
    tiles = [x[:, r:r + 16, c:c + 16] for r in (0, 16) for c in (0, 16)]
    centers = [src.load(i)[:, 10:26, 12:28] for i in range(6)]
    # Every tile is some image's crop, and the item is reproducible (any process, any worker).
    assert all(any(torch.equal(t, c) for c in centers) for t in tiles)
    again = TrainDataset(src, resolution=32, crop="center", flip=False, seed=1, mosaic=2)
    assert torch.equal(x, again[(0, 3)]["pixels"])
    assert not torch.equal(x, ds[(1, 3)]["pixels"])  # other partners next epoch
    with pytest.raises(UserError, match=r"data\.mosaic=3 must be >= 1 and divide data\.resolution=32"):
        TrainDataset(src, resolution=32, mosaic=3)


def test_mixed_mosaic_grids_draw_whole_images_and_grids_deterministically(tmp_path: Path):
    for i in range(6):
        _save(tmp_path / "g" / f"{i}.png", 16, 16, seed=i)
    src = open_source(str(tmp_path / "g"))
    ds = TrainDataset(src, resolution=32, crop="center", flip=False, seed=1, mosaic=2, mosaic_grids=(1, 2))
    grids = {k: ds.grid(0, k) for k in range(6)}
    assert set(grids.values()) == {1, 2}  # both sides drawn over 6 items (fixed seed)
    for k, g in grids.items():
        x = ds[(0, k)]["pixels"]
        assert x.shape == (3, 32, 32)
        # g=1: the keyed 16² image upscaled to the whole 32² item; g=2: its 16² tile top-left.
        expect = resize_shorter(src.load(k), 32) if g == 1 else src.load(k)
        assert torch.equal(x[:, :32 // g, :32 // g], expect)
    again = TrainDataset(src, resolution=32, crop="center", flip=False, seed=1, mosaic=2, mosaic_grids=(1, 2))
    assert all(torch.equal(ds[(0, k)]["pixels"], again[(0, k)]["pixels"]) for k in range(6))
    assert [ds.grid(e, 0) for e in range(8)] != [grids[0]] * 8  # redrawn each epoch
    # Without the list every item keeps `mosaic`.
    assert {TrainDataset(src, resolution=32, mosaic=2).grid(e, 0) for e in range(4)} == {2}
    with pytest.raises(UserError, match=r"data\.mosaic_grids entry=3 must be >= 1 and divide data\.resolution=32"):
        TrainDataset(src, resolution=32, mosaic_grids=(1, 3))


def test_color_cast_shifts_whole_items_deterministically_and_only_when_drawn(tmp_path: Path):
    for i in range(8):
        _save(tmp_path / "c" / f"{i}.png", 16, 16, seed=i)
    src = open_source(str(tmp_path / "c"))
    plain = TrainDataset(src, resolution=16, crop="center", flip=False, seed=2)
    half = TrainDataset(src, resolution=16, crop="center", flip=False, seed=2, color_cast=0.5)
    always = TrainDataset(src, resolution=16, crop="center", flip=False, seed=2, color_cast=1.0)
    changed = []
    for k in range(8):
        x, y, z = plain[(0, k)]["pixels"], half[(0, k)]["pixels"], always[(0, k)]["pixels"]
        assert torch.equal(x, src.load(k))  # color_cast=0 leaves items as they were
        assert z.shape == x.shape and z.min() >= -1 and z.max() <= 1
        # A cast moves the item's mean colour (offsets up to ±0.4) and is the same transform each time.
        assert not torch.allclose(z.mean((1, 2)), x.mean((1, 2)), atol=1e-3)
        assert torch.equal(z, always[(0, k)]["pixels"])
        changed.append(not torch.equal(y, x))
        if changed[-1]:  # p=0.5 draws the same cast as p=1 for the items it picks
            assert torch.equal(y, z)
    assert 0 < sum(changed) < 8  # p=0.5 casts some items and not others (fixed seed)
    assert not torch.equal(always[(1, 0)]["pixels"], always[(0, 0)]["pixels"])  # redrawn each epoch
    with pytest.raises(UserError, match=r"data\.color_cast must be a probability in \[0, 1\], got 1\.5"):
        TrainDataset(src, resolution=16, color_cast=1.5)


def test_val_mosaic_groups_consecutive_images(tmp_path: Path):
    for i in range(9):
        _save(tmp_path / "v" / f"{i}.png", 20, 20, seed=i)
    src = open_source(str(tmp_path / "v"))
    val = ValDataset(src, resolution=32, indices=list(range(9)), mosaic=2)
    assert len(val) == 2  # 9 images → two 2×2 mosaics, the 9th unused
    x = val[1]["pixels"]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[:, 16:, 16:], src.load(7)[:, 2:18, 2:18])


def test_small_images_upscaled_and_resize(tmp_path: Path):
    _save(tmp_path / "s" / "tiny.png", 20, 10)
    _save(tmp_path / "s" / "wide.png", 300, 100)
    src = open_source(str(tmp_path / "s"))
    ds = TrainDataset(src, resolution=32)
    assert ds[(0, 0)]["pixels"].shape == (3, 32, 32)  # 20×10 → 64×32 then cropped
    resized = ValDataset(src, resolution=32, resize=50)[1]["pixels"]  # 300×100 → 150×50 → center 32
    assert resized.shape == (3, 32, 32) and resized.min() >= -1 and resized.max() <= 1


# --- sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_sharding_disjoint(drop_last: bool):
    one = ResumableSampler(23, 6, seed=1, drop_last=drop_last)
    r0 = ResumableSampler(23, 3, seed=1, rank=0, world_size=2, drop_last=drop_last)
    r1 = ResumableSampler(23, 3, seed=1, rank=1, world_size=2, drop_last=drop_last)
    for full, b0, b1, _ in zip(one, r0, r1, range(12), strict=False):  # 12 steps ≈ 3 epochs
        assert len(b0) == len(b1) == 3
        assert b0 + b1 == full
        if drop_last:
            assert not set(b0) & set(b1)
    if drop_last:  # each epoch: 3 batches of distinct images from one permutation
        seen = [k for step in range(3) for _, k in one.batch_at(step)]
        assert len(set(seen)) == 18 and {e for e, _ in one.batch_at(3)} == {1}


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_exact(drop_last: bool):
    full = ResumableSampler(10, 4, seed=5, drop_last=drop_last)
    run = list(islice(full, 12))
    assert run[0] != run[3]
    for k in (1, 2, 5, 7):  # 2 (drop_last) or 2.5 batches per epoch: k crosses epoch boundaries
        resumed = ResumableSampler(10, 4, seed=5, drop_last=drop_last, start_step=k)
        assert list(islice(resumed, 4)) == run[k:k + 4]


def test_sampler_too_small_for_drop_last():
    with pytest.raises(UserError, match="global batch"):
        ResumableSampler(5, 4, seed=0, world_size=2)
    tiny = ResumableSampler(3, 4, seed=0, drop_last=False)  # stream mode copes with N < batch
    assert sorted(k for _, k in next(iter(tiny))[:3]) == [0, 1, 2]


def test_workers_match_single_process(folder: Path):
    ds = TrainDataset(open_source(str(folder)), resolution=24, resize=27, seed=2)  # exercises interpolation

    def batches(workers: int, start: int) -> list[dict]:
        sampler = ResumableSampler(len(ds), 5, seed=2, drop_last=False, start_step=start)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(islice(loader, 6 - start))

    ref, par, resumed = batches(0, 0), batches(2, 0), batches(2, 3)
    for a, b in zip(ref, par, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixels"], b["pixels"])
    for a, b in zip(ref[3:], resumed, strict=True):  # resume at step 3 = 3rd..5th batches, bit-exact
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixels"], b["pixels"])


# --- bad files ---------------------------------------------------------------------------------


def _with_bad_files(root: Path) -> Path:
    for i in range(4):
        _save(root / f"good{i}.png", 40, 40, seed=i)
    data = (root / "good0.png").read_bytes()
    (root / "corrupt.png").write_bytes(data[: len(data) // 3])  # truncated PNG
    (root / "text.png").write_text("this is not a png")
    return root


def test_bad_files_are_skipped_and_reported(tmp_path: Path):
    root = _with_bad_files(tmp_path / "mixed")
    src = open_source(str(root))
    assert len(src) == 6
    ds = TrainDataset(src, resolution=32, seed=0)
    bad = [k for k in range(6) if src.name(k) in ("corrupt.png", "text.png")]
    item = ds[(0, bad[0])]
    assert item["pixels"].shape == (3, 32, 32)  # replaced by a readable image
    assert item["index"] not in bad and item["skipped"][0][0] == src.name(bad[0])
    assert torch.equal(item["pixels"], ds[(0, bad[0])]["pixels"])  # replacement is deterministic
    assert ValDataset(src, 32)[bad[1]]["pixels"] is None

    skip_log = SkipLog(tmp_path / "skipped.txt")
    sampler = ResumableSampler(6, 3, seed=0, drop_last=True)
    loader = SkipLoggingLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, skip_log=skip_log)
    skipped = 0
    for batch in islice(loader, 4):  # 2 epochs: each bad file met twice
        assert batch["pixels"].shape == (3, 3, 32, 32)
        skipped += batch["skipped"]
    assert skipped == skip_log.count >= 4
    lines = (tmp_path / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == ["corrupt.png", "text.png"]  # once per file

    val = collate([ValDataset(src, 32)[k] for k in range(6)])
    assert val["pixels"].shape == (4, 3, 32, 32) and val["skipped"] == 2 and len(val["index"]) == 4


def test_all_bad_batch_is_an_error(tmp_path: Path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(3):
        (root / f"x{i}.jpg").write_bytes(b"\xff\xd8 broken")
    cfg = DataConfig(train=str(root), val_count=0, resolution=16, num_workers=0)
    train, _, _ = build_dataloaders(cfg, batch_size=2, seed=0)
    with pytest.raises(UserError, match="no readable image"):
        next(iter(train))


# --- validation and the train-script entry point -----------------------------------------------


def test_split_validation_disjoint():
    train, val = split_validation(20, 5)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_validation(20, 5) == (train, val)
    with pytest.raises(UserError, match="val_count"):
        split_validation(4, 4)


def test_build_dataloaders(folder: Path, tmp_path: Path):
    cfg = DataConfig(train=str(folder), resolution=24, val_count=3, num_workers=0)
    train, val, info = build_dataloaders(cfg, batch_size=4, seed=1, skip_log_path=tmp_path / "skipped.txt")
    assert info.train_images == 9 and info.val_images == 3 and "image folder" in str(info)
    train_seen = {int(i) for b in islice(train, 6) for i in b["index"]}
    val_batches = list(val)
    val_seen = {int(i) for b in val_batches for i in b["index"]}
    assert len(val_seen) == 3 and not train_seen & val_seen
    assert val_batches[0]["pixels"].shape == (3, 3, 24, 24)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(val_batches, list(val), strict=True))

    # rank 1 of 2, resumed at micro-step 2: its batch equals the second half of the 1-process global batch
    one, _, _ = build_dataloaders(cfg, batch_size=4, seed=1)
    steps = list(islice(one, 3))
    cfg2 = DataConfig(train=str(folder), resolution=24, val_count=3, num_workers=2)
    rank1, _, _ = build_dataloaders(cfg2, batch_size=2, seed=1, rank=1, world_size=2, start_step=2)
    batch = next(iter(rank1))
    assert torch.equal(batch["index"], steps[2]["index"][2:])
    assert torch.equal(batch["pixels"], steps[2]["pixels"][2:])

    with pytest.raises(UserError, match=r"data\.train is empty"):
        build_dataloaders(DataConfig(), batch_size=1, seed=0)


def test_explicit_val_source(folder: Path, tmp_path: Path):
    _save(tmp_path / "val" / "v.png", 50, 26)
    cfg = DataConfig(train=str(folder), val=str(tmp_path / "val"), resolution=24, num_workers=0)
    _, val, info = build_dataloaders(cfg, batch_size=4, seed=0)
    assert info.train_images == 12 and info.val_images == 1
    assert next(iter(val))["pixels"].shape == (1, 3, 24, 24)
    assert np.isfinite(next(iter(val))["pixels"].numpy()).all()


def test_corrupt_dataset_row_is_skipped(tmp_path: Path):
    import datasets

    rows = [{"bytes": _png_bytes(40, 40, i), "path": None} for i in range(3)]
    rows[1] = {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}
    rgba = Image.fromarray(make_photo(40, 40)).convert("RGBA")
    rgba.putalpha(0)  # fully transparent → white after compositing
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    rows.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "rows"))
    src = open_source(str(tmp_path / "rows"))
    with pytest.raises(UserError, match=r"rows\[1\]"):
        src.load(1)
    assert torch.equal(src.load(3), torch.ones(3, 40, 40))
    item = TrainDataset(src, resolution=32)[(0, 1)]
    assert item["pixels"] is not None and item["index"] != 1 and item["skipped"][0][0].endswith("rows[1]")


def _png_bytes(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_photo(width, height, seed)).save(buf, format="PNG")
    return buf.getvalue()
