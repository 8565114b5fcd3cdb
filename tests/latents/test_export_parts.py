"""encode-dataset --part-size: a large input shard's output in parts, resumed part by part, the same rows as whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import dataset_rows, encode_small, jpeg_bytes, write_tar
from sdvae.latents.format import read_dataset_meta


@pytest.fixture
def tars(tmp_path: Path) -> str:
    """Shard 0: 7 samples (one corrupt), shard 1: 6 (an exact multiple of the part size 3), shard 2: empty."""
    root = tmp_path / "tars"
    root.mkdir()
    seed = 0
    for s, n in enumerate((7, 6, 0)):
        members = []
        for j in range(n):
            data = b"\xff\xd8 not a jpeg" if (s, j) == (0, 4) else jpeg_bytes(seed, 36 + seed % 4, 34)
            members += [(f"{s}{j:03d}.jpg", data), (f"{s}{j:03d}.txt", f"photo {seed}".encode())]
            seed += 1
        write_tar(root / f"{s:05d}.tar", members)
    return str(root / "{00000..00002}.tar")


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def test_parts_hold_the_rows_of_whole_shards(tars: str, tmp_path: Path) -> None:
    whole = encode_small(tars, tmp_path / "whole")
    parted = encode_small(tars, tmp_path / "parts", part_size=3)
    assert parted["complete"] and (parted["rows"], parted["skipped"]) == (whole["rows"], whole["skipped"]) == (12, 1)
    assert dataset_rows(tmp_path / "parts") == dataset_rows(tmp_path / "whole")
    meta = read_dataset_meta(tmp_path / "parts")
    assert meta["shard_files"] == [f"data/shard-00000-000{p}.arrow" for p in range(3)] + [
        "data/shard-00001-0000.arrow", "data/shard-00001-0001.arrow", "data/shard-00002-0000.arrow"]
    assert meta["shard_rows"] == [3, 2, 1, 3, 3, 0] and meta["num_inputs"] == 13
    # 7 samples: parts of 3, 3, 1; 6 samples: exactly two parts (no empty third); an empty shard: one empty part
    assert [json.loads((tmp_path / "parts" / "data" / f"shard-0000{k}.done.json").read_text())["parts"]
            for k in range(3)] == [3, 2, 1]
    assert (tmp_path / "parts" / "data" / "shard-00000-0001.skipped.json").is_file()


def test_a_resumed_shard_encodes_only_its_missing_parts(tars: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    encode_small(tars, out, part_size=3)
    full = _files(out)
    # Killed after part 1 of shard 0: part 2, the unit's marker and the dataset files are missing.
    for name in ("shard-00000-0002.arrow", "shard-00000-0002.info.json", "shard-00000.done.json"):
        (out / "data" / name).unlink()
    (out / "sdvae_latents.json").unlink()
    again = encode_small(tars, out, part_size=3)
    assert again["complete"] and again["shards_done_before"] == 2 and again["encoded"] == 1  # part 2 only
    assert _files(out) == full
    # Killed between the last part's rows and the marker: nothing is encoded again.
    (out / "data" / "shard-00001.done.json").unlink()
    (out / "sdvae_latents.json").unlink()
    again = encode_small(tars, out, part_size=3)
    assert again["complete"] and again["encoded"] == again["unreadable"] == 0
    assert _files(out) == full
    assert encode_small(tars, out, part_size=3)["shards_encoded"] == 0


def test_part_size_is_an_argument_of_the_output(tars: str, tmp_path: Path) -> None:
    from sdvae.errors import UserError

    encode_small(tars, tmp_path / "out", part_size=3)
    with pytest.raises(UserError, match="part_size was 3, now 2"):
        encode_small(tars, tmp_path / "out", part_size=2)
