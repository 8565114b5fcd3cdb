"""Streamed input shards (sdvae.images.shard_stream): tar and parquet, local and on S3, with bad input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_photo
from sdvae.errors import UserError
from sdvae.images.load import load_image
from sdvae.images.shard_stream import ShardedSource, is_sharded_reference
from sdvae.storage import files, urls


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_photo(24 + seed, 20, seed=seed)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar_shards(base: str) -> list[bytes]:
    """Two img2dataset-style shards under ``base`` (local folder or URL): jpg + json + txt per sample, a
    metadata-only sample and a corrupt image in the first. Returns the images in stored order."""
    images = []
    for s, seeds in enumerate([(0, 1, 2), (3, 4)]):
        members = []
        for seed in seeds:
            key = f"{s:05d}{seed:04d}"
            images.append(_image(seed))
            members += [(f"{key}.jpg", images[-1]), (f"{key}.json", f'{{"seed": {seed}}}'.encode()),
                        (f"{key}.txt", f"caption {seed}".encode())]
        if s == 0:
            members += [("meta.json", b"{}"), ("broken.jpg", b"\xff\xd8 not a jpeg")]
        files.write_bytes(urls.join(base, f"{s:05d}.tar"), _tar(members))
    return images


def _check_tar_source(base: str, scratch: Path) -> None:
    images = _tar_shards(base)
    src = ShardedSource(urls.join(base, "{00000..00001}.tar"))
    assert src.kind == "webdataset" and len(src) == 2 and src.names == ["00000.tar", "00001.tar"]
    assert src.carry == ("json", "txt")
    got = [list(src.samples(k)) for k in range(2)]
    assert [[s.key for s in shard] for shard in got] == [["000000000", "000000001", "000000002", "broken"],
                                                         ["000010003", "000010004"]]
    good = [s for shard in got for s in shard if s.key != "broken"]
    for sample, data in zip(good, images, strict=True):
        assert sample.data == data and sample.ext == "jpg" and sample.error is None
        (scratch / "same.jpg").write_bytes(data)
        assert torch.equal(src.decode(sample), load_image(scratch / "same.jpg").tensor[0])  # as a file's decode
        assert sample.extras["txt"].startswith("caption") and sample.extras["json"].startswith('{"seed"')
    broken = got[0][3]
    assert broken.extras == {"json": None, "txt": None}
    with pytest.raises(UserError, match=r"^00000\.tar:broken\.jpg: not an image, or a format Pillow cannot read$"):
        src.decode(broken)
    assert not src.notes and src.extra_features() is not None
    assert src.fingerprint() == ShardedSource(urls.join(base, "*.tar")).fingerprint()
    files.write_bytes(urls.join(base, "list.txt"), b"# the second one only\n00001.tar\n")
    assert [s.key for s in ShardedSource(urls.join(base, "list.txt"), carry=["txt"]).samples(0)] == [
        "000010003", "000010004"]
    with pytest.raises(UserError, match=r"00000\.tar: the first sample of this shard has no 'cls' to carry "
                                        r"\(available: json, txt\)"):
        ShardedSource(urls.join(base, "*.tar"), carry=["cls"])
    with pytest.raises(UserError, match=r"00002\.tar: no such tar shard \(1 of 3 missing\)"):
        ShardedSource(urls.join(base, "{00000..00002}.tar"))


def test_tar_shards_stream_samples_with_their_members(tmp_path: Path) -> None:
    _check_tar_source(str(tmp_path / "shards"), tmp_path)


def test_decode_matches_the_same_image_as_a_file(tmp_path: Path) -> None:
    data = _image(7, "PNG")
    (tmp_path / "a.png").write_bytes(data)
    files.write_bytes(str(tmp_path / "00000.tar"), _tar([("a.png", data), ("a.cls", b"3")]))
    src = ShardedSource(str(tmp_path / "00000.tar"))
    (sample,) = src.samples(0)
    assert torch.equal(src.decode(sample), load_image(tmp_path / "a.png").tensor[0])
    assert src.decode(sample, channels=1).shape == (1, 20, 31) and sample.extras == {"cls": "3"}


@pytest.mark.parametrize("cut", ["inside", "boundary"])
def test_a_truncated_tar_keeps_the_samples_before_the_cut(tmp_path: Path, cut: str) -> None:
    members = [(f"k{i}.jpg", _image(i)) for i in range(3)]
    data = _tar(members)
    whole = len(_tar(members[:2])) - 1024 * 8  # bytes of two samples (without the end marker and padding)
    sizes = [512 + -(-len(d) // 512) * 512 for _, d in members]
    end = sizes[0] + sizes[1] + (sizes[2] // 2 if cut == "inside" else 0)
    assert whole <= end
    (tmp_path / "cut.tar").write_bytes(data[:end])
    src = ShardedSource(str(tmp_path / "cut.tar"))
    assert [s.key for s in src.samples(0)] == (["k0", "k1"])
    assert len(src.notes) == 1 and src.notes[0].startswith("cut.tar: truncated")
    (tmp_path / "whole.tar").write_bytes(data)
    intact = ShardedSource(str(tmp_path / "whole.tar"))
    assert len(list(intact.samples(0))) == 3 and not intact.notes


def test_not_a_tar_and_sharded_references(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match=r"^junk\.tar: not a readable tar shard"):
        ShardedSource(str(tmp_path / "junk.tar"))
    (tmp_path / "t.txt").write_text("a.tar\n")
    (tmp_path / "p.txt").write_text("# parquet\na.parquet\n")
    assert is_sharded_reference("s3://b/{00000..00009}.tar") and is_sharded_reference("gs://b/x/*.parquet")
    assert is_sharded_reference(str(tmp_path / "t.txt")) and is_sharded_reference(str(tmp_path / "p.txt"))
    assert not is_sharded_reference(str(tmp_path / "missing.txt")) and not is_sharded_reference(str(tmp_path))
    assert not is_sharded_reference("s3://b/x.png")


def _parquet(base: str, struct: bool = True, key: bool = False, bad_group: int | None = None) -> list[bytes]:
    """``base/00000.parquet``: 5 rows in row groups of 2, an image column and a caption; the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [_image(i, "PNG") for i in range(5)]
    column = [{"bytes": d, "path": f"im{i}.png"} for i, d in enumerate(images)] if struct else images
    table = {"image": column, "caption": [f"c{i}" for i in range(5)], "label": [i * 10 for i in range(5)]}
    if key:
        table["key"] = [f"id{i}" for i in range(5)]
    buf = io.BytesIO()
    pq.write_table(pa.table(table), buf, row_group_size=2, compression="none")
    data = bytearray(buf.getvalue())
    if bad_group is not None:  # garble the page header of the image column's chunk in that row group
        meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(bad_group).column(0)
        data[meta.data_page_offset:meta.data_page_offset + 16] = b"\xee" * 16
    files.write_bytes(urls.join(base, "00000.parquet"), bytes(data))
    return images


def _check_parquet_source(base: str) -> None:
    images = _parquet(base)
    src = ShardedSource(urls.join(base, "*.parquet"))
    assert src.kind == "parquet" and src.names == ["00000.parquet"] and src.carry == ("caption", "label")
    samples = list(src.samples(0))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s.data for s in samples] == images and {s.ext for s in samples} == {"png"}
    assert samples[3].extras == {"caption": "c3", "label": 30}  # parquet columns keep their types
    assert src.decode(samples[2]).shape == (3, 20, 26)
    with pytest.raises(UserError, match=r"00000\.parquet: no image column 'img' \(columns: image, caption, label\)"):
        ShardedSource(urls.join(base, "00000.parquet"), image_column="img")
    with pytest.raises(UserError, match=r"no 'cls' to carry \(available: caption, label\)"):
        ShardedSource(urls.join(base, "00000.parquet"), carry=["cls"])


def test_parquet_shards_stream_rows(tmp_path: Path) -> None:
    _check_parquet_source(str(tmp_path))


def test_parquet_binary_column_key_column_and_a_bad_row_group(tmp_path: Path) -> None:
    images = _parquet(str(tmp_path), struct=False, key=True, bad_group=1)
    src = ShardedSource(str(tmp_path / "00000.parquet"), carry=["caption"])
    samples = list(src.samples(0))
    assert [s.key for s in samples] == ["id0", "id1", "000000002", "id4"]
    assert samples[0].ext == "" and samples[0].data == images[0] and samples[3].data == images[4]
    bad = samples[2]
    assert bad.data is None and bad.error.startswith("00000.parquet:000000002: unreadable row group 1 (rows 2-3;")
    with pytest.raises(UserError, match="unreadable row group 1"):
        src.decode(bad)
    assert src.decode(samples[0]).shape == (3, 20, 24)


@pytest.mark.slow
def test_tar_and_parquet_shards_on_s3(s3: str, tmp_path: Path) -> None:
    _check_tar_source(urls.join(s3, "tars"), tmp_path)
    _check_parquet_source(urls.join(s3, "pq"))
    with pytest.raises(UserError, match=r"^s3://test-\w+/tars/00009\.tar: no such tar shard$"):
        ShardedSource(urls.join(s3, "tars", "00009.tar"))
