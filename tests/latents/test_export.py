"""sdvae encode-dataset / latent-stats / decode of a row: sources, storage, resume under kill -9, processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import dataset_rows, encode_small, make_photo, save_photo, shard_stats, stored_latent
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.images.sources import open_source
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.export import crop_for_encoding
from sdvae.latents.format import read_dataset_meta
from sdvae.model.build import build_preset
from sdvae.seeding import seeded_generator


def _hf_dataset(n: int = 7):
    import datasets

    rows = {"img": [Image.fromarray(make_photo(40 + i, 36, seed=i)) for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(rows, features=features)


# --- output content ------------------------------------------------------------------------------


def test_folder_one_row_per_readable_input(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = encode_small(images, out)
    assert summary["complete"] and summary["rows"] == 10 and summary["skipped"] == 2
    assert summary["encoded"] == 10 and summary["unreadable"] == 2  # this process's counts agree
    rows = dataset_rows(out)
    source = open_source(str(images))
    readable = [i for i in range(len(source)) if source.name(i) not in ("broken.png", "sub/empty.jpg")]
    assert [r["index"] for r in rows] == readable  # input order, no duplicates, none missing
    assert [r["key"] for r in rows] == [source.key(i) for i in readable]
    report = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == ["broken.png", "sub/empty.jpg"]
    assert all(len(line.split("\t")[1]) > 5 for line in report)  # a reason per file

    codec = Codec(build_preset("test"))
    for row in rows[:4]:  # the stored posterior is the model's, on the documented preprocessing
        image = source.load(row["index"])
        pixels, resized, box = crop_for_encoding(image, 32, "center", 8)
        enc = codec.encode(pixels[None])
        assert row["original_size"] == list(image.shape[-2:]) and row["resized_size"] == resized
        assert row["crop_box"] == box and box[2:] == [32, 32] and row["shape"] == [4, 4, 4]
        torch.testing.assert_close(stored_latent(row, "mean"), enc.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored_latent(row, "logvar"), enc.logvar[0], atol=1e-5, rtol=1e-5)

    meta = read_dataset_meta(out)
    assert meta["model"] == "test" and meta["scaled"] is False and meta["scaling"]["scaling_factor"] == 0.5
    assert meta["preprocessing"]["crop"] == "center" and meta["rows"] == 10 and meta["latent_columns"] == [
        "mean", "logvar"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert json.loads(info["description"])["config_hash"] == meta["config_hash"]


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A 1×1 PNG whose header claims ``width``×``height`` (no pixels allocated)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))


def test_skips_name_the_file_and_advise_only_what_the_command_accepts(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    save_photo(src / "good.png", 40, 32, seed=0)
    Image.new("RGB", (1, 1)).save(src / "dot.png")  # smaller than one latent cell
    _png_claiming(src / "claims-huge.png", 100_000, 100_000)  # above the decompression-bomb limit
    out = tmp_path / "out"

    assert main(["encode-dataset", str(src), str(out), "--model", "test", "--dtype", "fp32", "--no-progress",
                 "--num-workers", "0"]) == 0
    err = capsys.readouterr().err

    reasons = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert sorted(reasons) == ["claims-huge.png", "dot.png"]
    assert "dot.png" in reasons["dot.png"] and "1×1" in reasons["dot.png"]
    assert "latent cell" in reasons["dot.png"]
    assert "claims-huge.png" in reasons["claims-huge.png"] and "safety limit" in reasons["claims-huge.png"]
    for name in reasons:  # the progress lines name each file too
        assert any(name in line for line in err.splitlines() if "skipping" in line), err
    assert "--tile" not in err and "--tile" not in "".join(reasons.values())  # encode-dataset has no --tile


def test_dataset_sources_carry_columns(tmp_path: Path) -> None:
    import datasets

    ds = _hf_dataset()
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for ref, name in [(tmp_path / "train.parquet", "pq"), (tmp_path / "saved", "saved")]:
        out = tmp_path / f"out-{name}"
        encode_small(ref, out, image_column="img", cache_dir=str(tmp_path / "cache"))
        loaded = datasets.load_from_disk(str(out))
        assert loaded.features["label"].names == ["cat", "dog"]
        assert [r["caption"] for r in loaded] == [f"caption {i}" for i in range(7)]
        assert [r["label"] for r in loaded] == [i % 2 for i in range(7)]
        # parquet shards are streamed: key = shard/row number; a dataset folder is indexed: key = row index
        keys = [f"train.parquet/{i:09d}" for i in range(7)] if name == "pq" else [str(i) for i in range(7)]
        assert [r["key"] for r in loaded] == keys and [r["index"] for r in loaded] == list(range(7))
        item = LatentDataset(out)[3]
        assert item["caption"] == "caption 3" and item["label"] == 1
    # parquet readers see the same rows (load_dataset on the Arrow shards)
    arrow = datasets.load_dataset("arrow", data_files=str(tmp_path / "out-pq" / "data" / "*.arrow"), split="train",
                                  cache_dir=str(tmp_path / "cache"))
    assert arrow["caption"] == [f"caption {i}" for i in range(7)]

    encode_small(tmp_path / "saved", tmp_path / "only", image_column="img", carry=("caption",))
    assert "label" not in dataset_rows(tmp_path / "only")[0]
    assert read_dataset_meta(tmp_path / "only")["carried_columns"] == ["caption"]
    with pytest.raises(UserError, match=r"cannot carry column\(s\) 'nope'"):
        encode_small(tmp_path / "saved", tmp_path / "x", image_column="img", carry=("nope",))


@pytest.mark.parametrize(("store", "dtype"), [("mean", "fp16"), ("sample", "bf16"), ("mean_logvar", "bf16")])
def test_store_and_dtype(images: Path, tmp_path: Path, store: str, dtype: str) -> None:
    import datasets

    ref, out = tmp_path / "ref", tmp_path / "out"
    encode_small(images, ref)
    encode_small(images, out, store=store, dtype=dtype, seed=5)
    loaded = datasets.load_from_disk(str(out))
    arrow_type = {"fp16": "float16", "bf16": "uint16"}[dtype]  # bf16: raw bit patterns (Arrow has no bf16)
    columns = ["mean", "logvar"] if store == "mean_logvar" else ["latent"]
    assert all(loaded.features[c].feature.dtype == arrow_type for c in columns)
    assert "mean" not in loaded.column_names or store == "mean_logvar"
    tol = {"fp16": 0.01, "bf16": 0.08}[dtype]  # low-precision compute + storage vs fp32
    for row, base in zip(loaded, dataset_rows(ref), strict=True):
        mean, logvar = stored_latent(base, "mean"), stored_latent(base, "logvar")
        if store == "sample":  # one draw seeded by (seed, input index)
            eps = torch.randn(mean.shape, generator=seeded_generator(5, "encode-sample", row["index"]))
            expected = {"latent": mean + torch.exp(0.5 * logvar) * eps}
        else:
            expected = {"mean": mean, "logvar": logvar} if store == "mean_logvar" else {"latent": mean}
        for column, value in expected.items():
            torch.testing.assert_close(stored_latent(row, column, dtype), value, atol=tol, rtol=tol)


def test_crop_modes(images: Path, tmp_path: Path) -> None:
    encode_small(images, tmp_path / "r1", crop="random", seed=1)
    encode_small(images, tmp_path / "r2", crop="random", seed=1, batch_size=2, shard_size=3)
    encode_small(images, tmp_path / "r3", crop="random", seed=2)
    a, b, c = dataset_rows(tmp_path / "r1"), dataset_rows(tmp_path / "r2"), dataset_rows(tmp_path / "r3")
    assert [r["crop_box"] for r in a] == [r["crop_box"] for r in b]  # per image, not per batch/shard
    assert [r["crop_box"] for r in a] != [r["crop_box"] for r in c]
    assert any(r["crop_box"][:2] != [0, 0] for r in a)

    encode_small(images, tmp_path / "none", resolution=0)  # no resize: crop defaults to none
    rows = dataset_rows(tmp_path / "none")
    for row in rows:
        h, w = row["original_size"]
        assert row["crop_box"][2:] == [h - h % 8, w - w % 8] and row["shape"] == [4, h // 8, w // 8]
    assert len({tuple(r["shape"]) for r in rows}) > 1
    assert LatentDataset(tmp_path / "none")[0]["latent"].shape == tuple(rows[0]["shape"])


def test_bad_arguments(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs --resolution"):
        encode_small(images, tmp_path / "a", resolution=0, crop="center")
    with pytest.raises(UserError, match="not a multiple of the downsampling factor 8"):
        encode_small(images, tmp_path / "b", resolution=36)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an encode-dataset output"):
        encode_small(images, tmp_path / "busy")
    with pytest.raises(UserError, match="no columns to carry"):
        encode_small(images, tmp_path / "c", carry=("caption",))


def test_workers_match_main_process(images: Path, tmp_path: Path) -> None:
    encode_small(images, tmp_path / "w0", num_workers=0)
    encode_small(images, tmp_path / "w2", num_workers=2)
    a, b = dataset_rows(tmp_path / "w0"), dataset_rows(tmp_path / "w2")
    assert a == b
    # The preview map fitted at encode time too, exactly.
    fits = [read_dataset_meta(tmp_path / name)["preview_rgb"] for name in ("w0", "w2")]
    assert fits[0] is not None and fits[0] == fits[1]


# --- resume -----------------------------------------------------------------------------------------


def test_rerun_resumes_and_refuses_other_arguments(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    encode_small(images, out)
    full, fit = dataset_rows(out), read_dataset_meta(out)["preview_rgb"]
    # Lose one shard and the final files, as after a crash: only that shard is encoded again.
    (out / "data" / "shard-00001.arrow").unlink()
    (out / "sdvae_latents.json").unlink()
    with pytest.raises(UserError, match="has not finished"):
        LatentDataset(out)
    before = shard_stats(out)
    summary = encode_small(images, out)
    assert summary["shards_encoded"] == 1 and summary["shards_done_before"] == 2
    bad = out / "data" / "shard-00001.skipped.json"
    unreadable = len(json.loads(bad.read_text())) if bad.exists() else 0
    # The 4 inputs of that shard, split into rows and unreadable files.
    assert summary["unreadable"] == unreadable and summary["encoded"] == 4 - unreadable
    after = shard_stats(out)
    assert all(after[name] == stat for name, stat in before.items())  # finished shards untouched
    assert dataset_rows(out) == full
    assert fit is not None and read_dataset_meta(out)["preview_rgb"] == fit  # per-shard sums: exact on resume
    # A shard without its sums (written by an older version): no fitted map rather than a partial one.
    (out / "data" / "shard-00001.info.json").unlink()
    (out / "sdvae_latents.json").unlink()
    encode_small(images, out)
    assert read_dataset_meta(out)["preview_rgb"] is None
    assert encode_small(images, out)["shards_encoded"] == 0  # complete: nothing to do

    capsys.readouterr()
    code = main(["encode-dataset", str(images), str(out), "--model", "test", "--resolution", "64",
                 "--shard-size", "4", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("sdvae: error:")
    assert "resolution was 32, now 64" in err


# --- statistics, decode, preview ------------------------------------------------------------------


def test_preview_map_is_fitted_on_the_images_as_given_with_or_without_flip_copies(images: Path, tmp_path: Path):
    encode_small(images, tmp_path / "plain")
    encode_small(images, tmp_path / "flips", hflip="both")
    plain, flips = (read_dataset_meta(tmp_path / n)["preview_rgb"] for n in ("plain", "flips"))
    assert plain["cells"] == flips["cells"]  # the mirrored copies are not fitted on
    # The same map up to float rounding (the mirrored images share the model call, which changes the batch).
    np.testing.assert_allclose(plain["weight"], flips["weight"], atol=1e-4)
    np.testing.assert_allclose(plain["bias"], flips["bias"], atol=1e-4)
