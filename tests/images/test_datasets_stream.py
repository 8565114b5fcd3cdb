"""encode-dataset --streaming: a datasets source read with load_dataset(streaming=True), one unit per data shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import dataset_rows, encode_small, make_photo
from sdvae.errors import UserError
from sdvae.images.datasets_stream import DatasetsStreamSource


@pytest.fixture
def parquet_folder(tmp_path: Path) -> Path:
    """A local dataset folder of two parquet files (3 + 2 rows: images, captions, class labels)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    root = tmp_path / "ds"
    root.mkdir()
    for f, rows in enumerate([(0, 1, 2), (3, 4)]):
        part = datasets.Dataset.from_dict({"image": [Image.fromarray(make_photo(40 + i, 36, seed=i)) for i in rows],
                                           "caption": [f"caption {i}" for i in rows], "label": [i % 2 for i in rows]},
                                          features=features)
        part.to_parquet(str(root / f"train-{f:05d}-of-00002.parquet"))
    return root


def test_streamed_shards_hold_the_rows_of_the_indexed_run(parquet_folder: Path, tmp_path: Path) -> None:
    source = DatasetsStreamSource(str(parquet_folder), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 2 and source.carry == ("caption", "label")
    assert [s.key for s in source.samples(1)] == ["000000000", "000000001"]
    streamed = encode_small(parquet_folder, tmp_path / "streamed", streaming=True, cache_dir=str(tmp_path / "c1"))
    indexed = encode_small(parquet_folder, tmp_path / "indexed", cache_dir=str(tmp_path / "c2"))
    assert streamed["complete"] and streamed["rows"] == indexed["rows"] == 5 and streamed["shards_total"] == 2
    a, b = dataset_rows(tmp_path / "streamed"), dataset_rows(tmp_path / "indexed")
    assert [r["key"] for r in a] == ["shard00000/000000000", "shard00000/000000001", "shard00000/000000002",
                                     "shard00001/000000000", "shard00001/000000001"]
    assert [r["caption"] for r in a] == [r["caption"] for r in b] == [f"caption {i}" for i in range(5)]
    assert [r["label"] for r in a] == [i % 2 for i in range(5)]  # a class label stays a class label
    for x, y in zip(a, b, strict=True):  # the same images, centre-cropped: the same posterior
        np.testing.assert_allclose(x["mean"], y["mean"], atol=1e-5)


def test_bad_streaming_sources_are_one_line(parquet_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no image column 'img' \(columns: image, caption, label\)"):
        DatasetsStreamSource(str(parquet_folder), image_column="img", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"no column 'nope' to carry"):
        DatasetsStreamSource(str(parquet_folder), carry=("nope",), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"cannot stream this dataset") as err:
        DatasetsStreamSource(str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
