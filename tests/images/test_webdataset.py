"""WebDataset tar shards as an image source (sdvae.images.webdataset) and as encode-dataset's SRC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import dataset_rows, encode_small, jpeg_bytes, stored_latent, write_tar
from sdvae.errors import UserError
from sdvae.images.load import load_image
from sdvae.images.sources import open_source
from sdvae.images.webdataset import WebDatasetSource


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards as img2dataset writes them: 5 samples with jpg + json + txt, one json-only sample, one
    corrupt image; plus the same images as files in shards/ref/ (for comparison)."""
    root = tmp_path / "shards"
    (root / "ref").mkdir(parents=True)
    for s, seeds in enumerate([(0, 1, 2), (3, 4)]):
        members = []
        for seed in seeds:
            key = f"{s:05d}{seed:04d}"
            data = jpeg_bytes(seed)
            (root / "ref" / f"{key}.jpg").write_bytes(data)
            members += [(f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key, "seed": seed}).encode()),
                        (f"{key}.txt", f"caption {seed}".encode())]
        if s == 0:
            members += [("metadata-only.json", b"{}"), ("broken.jpg", b"\xff\xd8 not a jpeg")]
        write_tar(root / f"{s:05d}.tar", members)
    return root


def test_samples_in_shard_order_with_their_members(shards: Path) -> None:
    src = open_source(str(shards / "{00000..00001}.tar"), carry=None)
    assert isinstance(src, WebDatasetSource) and len(src) == 6  # 5 photos + the broken one; json-only left out
    assert [src.key(i) for i in range(len(src))] == [
        "00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002", "00000.tar/broken",
        "00001.tar/000010003", "00001.tar/000010004"]
    assert src.carry == ("json", "txt")
    for i in (0, 2, 4, 5):
        key = src.key(i).split("/")[1]
        expected = load_image(shards / "ref" / f"{key}.jpg").tensor[0]
        assert torch.equal(src.load(i), expected)  # the same decode as the file on disk
        assert json.loads(src.extras(i)["json"])["key"] == key and src.extras(i)["txt"].startswith("caption")
    assert src.extras(3) == {"json": None, "txt": None}
    with pytest.raises(UserError, match=r"00000\.tar:broken\.jpg: not an image, or a format Pillow cannot read$"):
        src.load(3)


def test_glob_and_list_file_name_the_same_shards(shards: Path) -> None:
    (shards / "list.txt").write_text("# two shards\n00000.tar\n00001.tar\n")
    keys = [[s.key(i) for i in range(len(s))] for s in (
        open_source(str(shards / "{00000..00001}.tar")), open_source(str(shards / "*.tar")),
        open_source(str(shards / "list.txt")))]
    assert keys[0] == keys[1] == keys[2]
    assert open_source(str(shards / "00001.tar")).key(0) == "00001.tar/000010003"


def test_bad_references_are_one_line(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"00002\.tar: no such tar shard"):
        open_source(str(shards / "{00000..00002}.tar"))
    with pytest.raises(UserError, match="no sample has a 'cls' member"):
        open_source(str(shards / "00000.tar"), carry=["cls"])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match=r"junk\.tar: not a readable tar shard"):
        open_source(str(tmp_path / "junk.tar"))


def test_truncated_shard_keeps_what_precedes_the_damage(shards: Path, tmp_path: Path) -> None:
    data = (shards / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    src = open_source(str(cut))
    assert 0 < len(src) < 4 and src.notes and "cut.tar" in src.notes[0]
    for i in range(len(src)):
        try:
            src.load(i)
        except UserError as err:  # the last member may be the cut one: one line naming it
            assert "cut.tar" in str(err)


def test_encode_dataset_from_shards_equals_the_same_images_as_files(shards: Path, tmp_path: Path) -> None:
    summary = encode_small(str(shards / "{00000..00001}.tar"), tmp_path / "from-tar")
    assert summary["complete"] and summary["rows"] == 5 and summary["skipped"] == 1
    skipped = (tmp_path / "from-tar" / "skipped.txt").read_text()
    assert skipped.startswith("00000.tar:broken.jpg\t")
    encode_small(shards / "ref", tmp_path / "from-files")
    tar_rows, file_rows = dataset_rows(tmp_path / "from-tar"), dataset_rows(tmp_path / "from-files")
    assert [r["key"].split("/")[1] for r in tar_rows] == [r["key"].removesuffix(".jpg") for r in file_rows]
    for a, b in zip(tar_rows, file_rows, strict=True):
        # the same pixels (batches differ: the broken member shifts them, so allow float noise)
        torch.testing.assert_close(stored_latent(a, "mean"), stored_latent(b, "mean"), atol=1e-5, rtol=1e-5)
        assert json.loads(a["json"])["key"] == b["key"].removesuffix(".jpg") and a["txt"].startswith("caption")
