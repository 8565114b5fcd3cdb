"""Latent rows as WebDataset tar shards: bytes, read-back, the webdataset library, LatentDataset on that layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import encode_small, make_photo
from sdvae.errors import UserError
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.webdataset_format import TarIndex, iter_tar_samples, read_shard_tar, shard_tar_bytes

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}


def _rows(n: int, dtype: str, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        shape = [4, 2 + i % 2, 3]
        values = rng.standard_normal(int(np.prod(shape))).astype(np.float32)
        stored = (torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                  if dtype == "bf16" else values.astype(NP_DTYPES[dtype]))
        rows.append({"key": f"img{i}.png", "index": 3 * i, "shape": shape, "original_size": [40, 30 + i],
                     "resized_size": [32, 32], "crop_box": [0, i, 32, 24], "bucket": [32, 24],
                     "latents": {"mean": stored, "logvar": stored[::-1].copy()},
                     "extras": {"caption": f"caption é {i}", "label": i % 2, "mask": {"bytes": bytes([i, 0, 255]),
                                                                                    "path": None}}})
    return rows


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_rows_round_trip_bit_exact_and_bytes_are_deterministic(dtype: str) -> None:
    rows = _rows(5, dtype)
    data = shard_tar_bytes(rows, dtype, ["caption", "label", "mask"])
    assert data == shard_tar_bytes(_rows(5, dtype), dtype, ["caption", "label", "mask"])  # a rerun: same bytes
    back = list(read_shard_tar(data))
    assert len(back) == len(rows)
    for got, want in zip(back, rows, strict=True):
        assert {k: got[k] for k in want if k not in ("latents", "extras")} == {
            k: want[k] for k in want if k not in ("latents", "extras")}
        assert got["extras"] == want["extras"]  # bytes come back as bytes, ints as ints
        for column in ("mean", "logvar"):
            assert got["latents"][column].dtype == NP_DTYPES[dtype]
            assert np.array_equal(got["latents"][column], want["latents"][column])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert members[0].name == "000000000000.json" and members[1].name == "000000000000.latents.safetensors"
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.pax_headers for m in members)


def test_the_webdataset_library_reads_the_shards(tmp_path: Path) -> None:
    import webdataset as wds
    from safetensors.torch import load

    rows = _rows(4, "bf16")
    path = tmp_path / "shard-00000.tar"
    path.write_bytes(shard_tar_bytes(rows, "bf16", ["caption"]))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{3 * i:012d}" for i in range(4)]
    for sample, row in zip(samples, rows, strict=True):
        doc = json.loads(sample["json"])
        assert doc["index"] == row["index"] and doc["shape"] == row["shape"] and doc["caption"] == row["extras"][
            "caption"] and "label" not in doc
        tensors = load(sample["latents.safetensors"])
        assert tensors["mean"].dtype == torch.bfloat16 and list(tensors["mean"].shape) == row["shape"]
        assert np.array_equal(tensors["mean"].view(torch.int16).numpy().view(np.uint16).ravel(),
                              row["latents"]["mean"])


def test_index_reads_rows_by_offset(tmp_path: Path) -> None:
    rows = _rows(7, "fp16")
    refs = []
    for k, part in enumerate((rows[:3], rows[3:], [])):  # an empty shard too
        refs.append(str(tmp_path / f"shard-{k}.tar"))
        Path(refs[-1]).write_bytes(shard_tar_bytes(part, "fp16", ["caption"]))
    index = TarIndex(refs, [3, 4, 0])
    assert len(index) == 7 and index.shapes() == [r["shape"] for r in rows]
    for i in (0, 4, 6, -1, 2):
        got = index.read(i)
        assert got["index"] == rows[i]["index"] and np.array_equal(got["latents"]["logvar"],
                                                                   rows[i]["latents"]["logvar"])
    with pytest.raises(IndexError):
        index.read(7)
    with pytest.raises(UserError, match=r"shard-1\.tar: holds 4 rows, the metadata says 5"):
        TarIndex(refs, [3, 5, 0])


def test_bad_input_is_one_line_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"column 'when' of row 000000000000: a datetime value cannot be stored"):
        import datetime

        shard_tar_bytes([{**_rows(1, "fp32")[0], "extras": {"when": datetime.datetime.now()}}], "fp32", ["when"])
    with pytest.raises(UserError, match=r"x\.tar: not a readable tar shard"):
        list(read_shard_tar(b"not a tar archive" * 64, "x.tar"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # a foreign tar: samples without our members
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(UserError, match=r"y\.tar:a: sample has no json member"):
        list(read_shard_tar(buffer.getvalue(), "y.tar"))
    assert [key for key, _ in iter_tar_samples(buffer.getvalue())] == ["a"]
    (tmp_path / "z.tar").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match=r"z\.tar:a: sample lacks its json or latents\.safetensors member"):
        TarIndex([str(tmp_path / "z.tar")])


# --- LatentDataset on the webdataset layout --------------------------------------------------------


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same latent rows (bf16, carried caption + class label) in the arrow and the webdataset layout."""
    import datasets

    root = tmp_path_factory.mktemp("layouts")
    n = 7
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict({"img": [Image.fromarray(make_photo(40 + i, 36, seed=i)) for i in range(n)],
                                "caption": [f"caption {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
                               features=features).save_to_disk(str(root / "saved"))
    arrow, wds = root / "arrow", root / "wds"
    for out, layout in ((arrow, "arrow"), (wds, "webdataset")):  # encode-dataset --format arrow|webdataset
        encode_small(root / "saved", out, image_column="img", dtype="bf16", cache_dir=str(root / "cache"),
                     format=layout)
    return arrow, wds


def _same_items(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_latent_dataset_reads_the_webdataset_layout_as_the_arrow_one(two_layouts: tuple[Path, Path]) -> None:
    arrow, wds = two_layouts
    a, w = LatentDataset(arrow, seed=2), LatentDataset(wds, seed=2)
    assert w.layout == "webdataset" and a.layout == "arrow" and len(w) == len(a) == 7
    assert w.shapes() == a.shapes()
    for i in range(len(a)):
        assert _same_items(w[i], a[i])  # the same posterior draw (seed, epoch, index), same carried values
    assert w[3]["caption"] == "caption 3" and w[3]["label"] == a[3]["label"]
    w.set_epoch(1)
    assert not torch.equal(w[3]["latent"], a[3]["latent"])
    mean_w, row_w = LatentDataset(wds, scaled=False, sample=False, columns=[]).unscaled(-1)
    mean_a, row_a = LatentDataset(arrow, scaled=False, sample=False, columns=[]).unscaled(-1)
    assert torch.equal(mean_w, mean_a) and row_w == row_a and "caption" not in row_w
    batches = list(torch.utils.data.DataLoader(LatentDataset(wds, seed=2), batch_size=3, num_workers=2))
    assert torch.cat([b["index"] for b in batches]).tolist() == [a[i]["index"] for i in range(7)]
    assert torch.equal(torch.cat([b["latent"] for b in batches]), torch.stack([a[i]["latent"] for i in range(7)]))
    with pytest.raises(IndexError):
        w[7]


def test_a_damaged_webdataset_shard_is_named(two_layouts: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    wds = shutil.copytree(two_layouts[1], tmp_path / "wds")
    shard = wds / "data" / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:1536])  # cut inside the first sample's latents
    with pytest.raises(UserError, match=r"shard-00001\.tar"):
        LatentDataset(wds)


def upload(folder: Path, url: str) -> str:
    """Copy a local folder to ``url`` (object storage), file by file."""
    from sdvae.storage import files
    from sdvae.storage.urls import join

    for path in folder.rglob("*"):
        if path.is_file():
            files.write_bytes(join(url, path.relative_to(folder).as_posix()), path.read_bytes())
    return url


@pytest.mark.slow
def test_latent_dataset_reads_both_layouts_from_object_storage(two_layouts: tuple[Path, Path], s3: str) -> None:
    from sdvae.storage import files
    from sdvae.storage.urls import join

    local = LatentDataset(two_layouts[0], seed=2)
    for folder in two_layouts:
        url = upload(folder, join(s3, folder.name))
        remote = LatentDataset(url, seed=2)
        assert remote.path == url and len(remote) == len(local) and remote.shapes() == local.shapes()
        for i in (0, 5, 2, -1, 3):  # out of order: the arrow reader fetches shards again
            assert _same_items(remote[i], local[i])
        batches = list(torch.utils.data.DataLoader(remote, batch_size=4, num_workers=2))
        assert torch.equal(torch.cat([b["latent"] for b in batches]), torch.stack([local[i]["latent"]
                                                                                  for i in range(len(local))]))
    # An arrow dataset from before shard_files/shard_rows: its shards are listed and counted.
    meta = json.loads((two_layouts[0] / "sdvae_latents.json").read_text())
    for key in ("layout", "shard_files", "shard_rows"):
        meta.pop(key, None)
    files.write_json(join(s3, "arrow", "sdvae_latents.json"), meta)
    old = LatentDataset(join(s3, "arrow"), seed=2)
    assert len(old) == len(local) and _same_items(old[6], local[6])
    with pytest.raises(UserError, match=r"s3://.*/nothing: not an `sdvae encode-dataset` output"):
        LatentDataset(join(s3, "nothing"))
