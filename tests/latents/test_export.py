"""sdvae encode-dataset / latent-stats / decode of a row: sources, storage, resume under kill -9, processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, make_photo
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.images.sources import open_source
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.export import EncodeOptions, crop_for_encoding, run_encode
from sdvae.latents.format import read_dataset_meta, stored_to_tensor
from sdvae.model.build import build_preset
from sdvae.seeding import seeded_generator

# `sdvae ARGS` with every batch slowed down, so a test can kill the job between two shards.
SLOW_CLI = ("import sys, time; import sdvae.latents.export as e; encode = e._encode_batch; "
            "e._encode_batch = lambda *a, **k: (time.sleep(0.4), encode(*a, **k))[1]; "
            "from sdvae.cli.main import main; sys.exit(main(sys.argv[1:]))")


def _save(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_photo(width, height, seed)).save(path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """10 readable images in nested folders (varied sizes) and 2 unreadable ones."""
    root = tmp_path / "imgs"
    for i in range(10):
        _save(root / ("sub/" if i % 3 == 0 else "") / f"im{i:02d}.png", 36 + 3 * i, 34 + 2 * (i % 4), seed=i)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "sub" / "empty.jpg").write_bytes(b"")
    return root


def _hf_dataset(n: int = 7):
    import datasets

    rows = {"img": [Image.fromarray(make_photo(40 + i, 36, seed=i)) for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(rows, features=features)


def _encode(src: Path | str, out: Path, **kw) -> dict:
    kw = {"resolution": 32, "shard_size": 4, "batch_size": 3, **kw}
    return run_encode(EncodeOptions(src=str(src), out=str(out), model="test", progress=False, **kw))


def _rows(out: Path) -> list[dict]:
    import datasets

    return list(datasets.load_from_disk(str(out)))


def _latent(row: dict, column: str, dtype: str = "fp32") -> torch.Tensor:
    return stored_to_tensor(row[column], dtype, row["shape"])


# --- output content ------------------------------------------------------------------------------


def test_folder_one_row_per_readable_input(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = _encode(images, out)
    assert summary["complete"] and summary["rows"] == 10 and summary["skipped"] == 2
    assert summary["encoded"] == 10 and summary["unreadable"] == 2  # this process's counts agree
    rows = _rows(out)
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
        torch.testing.assert_close(_latent(row, "mean"), enc.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_latent(row, "logvar"), enc.logvar[0], atol=1e-5, rtol=1e-5)

    meta = read_dataset_meta(out)
    assert meta["model"] == "test" and meta["scaled"] is False and meta["scaling"]["scaling_factor"] == 0.5
    assert meta["preprocessing"]["crop"] == "center" and meta["rows"] == 10 and meta["latent_columns"] == [
        "mean", "logvar"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert json.loads(info["description"])["config_hash"] == meta["config_hash"]


def test_dataset_sources_carry_columns(tmp_path: Path) -> None:
    import datasets

    ds = _hf_dataset()
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for ref, name in [(tmp_path / "train.parquet", "pq"), (tmp_path / "saved", "saved")]:
        out = tmp_path / f"out-{name}"
        _encode(ref, out, image_column="img", cache_dir=str(tmp_path / "cache"))
        loaded = datasets.load_from_disk(str(out))
        assert loaded.features["label"].names == ["cat", "dog"]
        assert [r["caption"] for r in loaded] == [f"caption {i}" for i in range(7)]
        assert [r["label"] for r in loaded] == [i % 2 for i in range(7)]
        assert [r["key"] for r in loaded] == [str(i) for i in range(7)]
        item = LatentDataset(out)[3]
        assert item["caption"] == "caption 3" and item["label"] == 1
    # parquet readers see the same rows (load_dataset on the Arrow shards)
    arrow = datasets.load_dataset("arrow", data_files=str(tmp_path / "out-pq" / "data" / "*.arrow"), split="train",
                                  cache_dir=str(tmp_path / "cache"))
    assert arrow["caption"] == [f"caption {i}" for i in range(7)]

    _encode(tmp_path / "saved", tmp_path / "only", image_column="img", carry=("caption",))
    assert "label" not in _rows(tmp_path / "only")[0] and read_dataset_meta(tmp_path / "only")["carried_columns"] == [
        "caption"]
    with pytest.raises(UserError, match=r"cannot carry column\(s\) 'nope'"):
        _encode(tmp_path / "saved", tmp_path / "x", image_column="img", carry=("nope",))


@pytest.mark.parametrize(("store", "dtype"), [("mean", "fp16"), ("sample", "bf16"), ("mean_logvar", "bf16")])
def test_store_and_dtype(images: Path, tmp_path: Path, store: str, dtype: str) -> None:
    import datasets

    ref, out = tmp_path / "ref", tmp_path / "out"
    _encode(images, ref)
    _encode(images, out, store=store, dtype=dtype, seed=5)
    loaded = datasets.load_from_disk(str(out))
    arrow_type = {"fp16": "float16", "bf16": "uint16"}[dtype]  # bf16: raw bit patterns (Arrow has no bf16)
    columns = ["mean", "logvar"] if store == "mean_logvar" else ["latent"]
    assert all(loaded.features[c].feature.dtype == arrow_type for c in columns)
    assert "mean" not in loaded.column_names or store == "mean_logvar"
    tol = {"fp16": 0.01, "bf16": 0.08}[dtype]  # low-precision compute + storage vs fp32
    for row, base in zip(loaded, _rows(ref), strict=True):
        mean, logvar = _latent(base, "mean"), _latent(base, "logvar")
        if store == "sample":  # one draw seeded by (seed, input index)
            eps = torch.randn(mean.shape, generator=seeded_generator(5, "encode-sample", row["index"]))
            expected = {"latent": mean + torch.exp(0.5 * logvar) * eps}
        else:
            expected = {"mean": mean, "logvar": logvar} if store == "mean_logvar" else {"latent": mean}
        for column, value in expected.items():
            torch.testing.assert_close(_latent(row, column, dtype), value, atol=tol, rtol=tol)


def test_crop_modes(images: Path, tmp_path: Path) -> None:
    _encode(images, tmp_path / "r1", crop="random", seed=1)
    _encode(images, tmp_path / "r2", crop="random", seed=1, batch_size=2, shard_size=3)
    _encode(images, tmp_path / "r3", crop="random", seed=2)
    a, b, c = _rows(tmp_path / "r1"), _rows(tmp_path / "r2"), _rows(tmp_path / "r3")
    assert [r["crop_box"] for r in a] == [r["crop_box"] for r in b]  # per image, not per batch/shard
    assert [r["crop_box"] for r in a] != [r["crop_box"] for r in c]
    assert any(r["crop_box"][:2] != [0, 0] for r in a)

    _encode(images, tmp_path / "none", resolution=0)  # no resize: crop defaults to none
    rows = _rows(tmp_path / "none")
    for row in rows:
        h, w = row["original_size"]
        assert row["crop_box"][2:] == [h - h % 8, w - w % 8] and row["shape"] == [4, h // 8, w // 8]
    assert len({tuple(r["shape"]) for r in rows}) > 1
    assert LatentDataset(tmp_path / "none")[0]["latent"].shape == tuple(rows[0]["shape"])


def test_bad_arguments(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs --resolution"):
        _encode(images, tmp_path / "a", resolution=0, crop="center")
    with pytest.raises(UserError, match="not a multiple of the downsampling factor 8"):
        _encode(images, tmp_path / "b", resolution=36)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an encode-dataset output"):
        _encode(images, tmp_path / "busy")
    with pytest.raises(UserError, match="no columns to carry"):
        _encode(images, tmp_path / "c", carry=("caption",))


def test_workers_match_main_process(images: Path, tmp_path: Path) -> None:
    _encode(images, tmp_path / "w0", num_workers=0)
    _encode(images, tmp_path / "w2", num_workers=2)
    a, b = _rows(tmp_path / "w0"), _rows(tmp_path / "w2")
    assert a == b


# --- resume -----------------------------------------------------------------------------------------


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "data").glob("shard-*.arrow"))}


def test_rerun_resumes_and_refuses_other_arguments(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _encode(images, out)
    full = _rows(out)
    # Lose one shard and the final files, as after a crash: only that shard is encoded again.
    (out / "data" / "shard-00001.arrow").unlink()
    (out / "sdvae_latents.json").unlink()
    with pytest.raises(UserError, match="has not finished"):
        LatentDataset(out)
    before = _shard_stats(out)
    summary = _encode(images, out)
    assert summary["shards_encoded"] == 1 and summary["shards_done_before"] == 2
    bad = out / "data" / "shard-00001.skipped.json"
    unreadable = len(json.loads(bad.read_text())) if bad.exists() else 0
    # The 4 inputs of that shard, split into rows and unreadable files.
    assert summary["unreadable"] == unreadable and summary["encoded"] == 4 - unreadable
    after = _shard_stats(out)
    assert all(after[name] == stat for name, stat in before.items())  # finished shards untouched
    assert _rows(out) == full
    assert _encode(images, out)["shards_encoded"] == 0  # complete: nothing to do

    capsys.readouterr()
    code = main(["encode-dataset", str(images), str(out), "--model", "test", "--resolution", "64",
                 "--shard-size", "4", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("sdvae: error:")
    assert "resolution was 32, now 64" in err


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun(images: Path, tmp_path: Path) -> None:
    """kill -9 while a shard is half done, rerun: exactly one row per readable input, finished shards kept."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = ["encode-dataset", str(images), str(out), "--model", "test",
           "--resolution", "32", "--shard-size", "2", "--batch-size", "1", "--num-workers", "1", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *cmd], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "data" / "shard-00001.arrow").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.5)  # into the next shard's first batch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _shard_stats(out)
    assert 2 <= len(done) < 6 and not (out / "sdvae_latents.json").exists() and not (out / "state.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "sdvae.cli", *cmd], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(done)} already done" in rerun.stdout and "complete: 10 rows" in rerun.stdout
    after = _shard_stats(out)
    assert all(after[name] == stat for name, stat in done.items())
    assert not list((out / "data").glob(".*.tmp"))
    _encode(images, ref, shard_size=2, batch_size=1)
    assert _rows(out) == _rows(ref)


@pytest.mark.slow
def test_two_processes_match_one(images: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = [str(images), "--model", "test", "--resolution", "32", "--shard-size", "3", "--batch-size", "2",
              "--num-workers", "0", "--json", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sdvae.cli"]
    proc = subprocess.run([*launcher, "encode-dataset", *common[:1], str(two), *common[1:]], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert sum(s["shards_encoded"] for s in summaries) == math.ceil(12 / 3)
    assert any(s["complete"] for s in summaries)
    _encode(images, one, shard_size=3, batch_size=2)
    a, b = _rows(one), _rows(two)
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(a) == 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["mean"], y["mean"], atol=1e-5)
        np.testing.assert_allclose(x["logvar"], y["logvar"], atol=1e-5)


# --- statistics, decode, preview ------------------------------------------------------------------


def test_latent_stats_exact_and_write_config(images: Path, tmp_path: Path, capsys) -> None:
    from sdvae.latents.stats import compute_latent_stats
    from sdvae.model.load import load_vae
    from sdvae.model.save import save_diffusers

    out = tmp_path / "out"
    _encode(images, out, resolution=0)  # --crop none: rows of different shapes
    rows = _rows(out)
    means = torch.cat([_latent(r, "mean").double().flatten(1) for r in rows], 1)  # (C, all positions)
    variances = torch.cat([_latent(r, "logvar").double().exp().flatten(1) for r in rows], 1)

    stats = compute_latent_stats(out, over="mean")
    np.testing.assert_allclose(stats.channel_mean, means.mean(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(stats.channel_std, means.std(1, correction=0).numpy(), rtol=1e-10)
    np.testing.assert_allclose([stats.mean, stats.std], [means.mean().item(), means.std(correction=0).item()],
                               rtol=1e-10)
    post = compute_latent_stats(out)  # auto → posterior: Var = Var(mean) + E[exp(logvar)]
    assert post.over == "posterior"
    np.testing.assert_allclose(post.channel_std, (means.var(1, correction=0) + variances.mean(1)).sqrt().numpy(),
                               rtol=1e-10)
    np.testing.assert_allclose(post.std, math.sqrt(means.var(correction=0).item() + variances.mean().item()),
                               rtol=1e-10)
    assert post.scaling_factor == pytest.approx(1 / post.std) and post.shift_factor == pytest.approx(post.mean)

    model = tmp_path / "model"
    save_diffusers(build_preset("test"), model)
    assert main(["latent-stats", str(out), "--over", "mean", "--write-config", str(model)]) == 0
    printed = capsys.readouterr().out
    assert f"scaling_factor = 1/std = {stats.scaling_factor:.6f}" in printed and "wrote scaling_factor" in printed
    config = json.loads((model / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(stats.scaling_factor, rel=1e-12)
    assert config["shift_factor"] == pytest.approx(stats.mean, rel=1e-12)
    assert load_vae(str(model)).config.scaling_factor == pytest.approx(stats.scaling_factor)
    # With the new factors in force, the scaled means have zero mean and unit std over the dataset.
    data = LatentDataset(out, sample=False, scaling=model)
    scaled = torch.cat([data[i]["latent"].double().flatten() for i in range(len(data))])
    assert abs(scaled.mean().item()) < 1e-5 and scaled.std(correction=0).item() == pytest.approx(1, abs=1e-5)

    assert main(["latent-stats", str(out), "--over", "mean", "--write-config", str(model), "--per-channel",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = json.loads((model / "config.json").read_text())
    assert config["latents_std"] == result["channel_std"] and config["scaling_factor"] == 1.0
    data = LatentDataset(out, sample=False, scaling=model)
    per_channel = torch.cat([data[i]["latent"].double().flatten(1) for i in range(len(data))], 1)
    np.testing.assert_allclose(per_channel.std(1, correction=0).numpy(), 1.0, atol=1e-5)


def test_decode_row_and_preview(images: Path, tmp_path: Path, capsys) -> None:
    out, dest = tmp_path / "out", tmp_path / "dec"
    _encode(images, out)
    assert main(["decode", str(out), "-o", str(dest), "--row", "2", "--row", "5", "--preview", "--model", "test"]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["row-000002.png", "row-000002.preview.png", "row-000005.png", "row-000005.preview.png"]
    assert Image.open(dest / "row-000002.png").size == (32, 32) == Image.open(dest / "row-000002.preview.png").size
    # The decoded row is the decoder's output for the stored mean.
    expected = Codec(build_preset("test")).decode(_latent(_rows(out)[2], "mean")[None])
    got = torch.from_numpy(np.asarray(Image.open(dest / "row-000002.png"), dtype=np.float32) / 127.5 - 1)
    assert (got.permute(2, 0, 1) - expected[0].clamp(-1, 1)).abs().max() < 2 / 255 + 1e-6
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "p"), "--row", "0", "--preview-only"]) == 0
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["row-000000.preview.png"]
    assert main(["decode", str(out), "-o", str(dest), "--row", "99"]) == 2
    assert "no row 99 (the dataset has 10 rows)" in capsys.readouterr().err
