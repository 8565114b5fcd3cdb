"""sdvae encode-dataset / latent-stats / decode of a row from the command line: kill -9 and resume,
two processes, latent statistics and their config write, decoding and previewing rows."""

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

from helpers import REPO, dataset_rows, encode_small, shard_stats, stored_latent
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.latents.dataset import LatentDataset
from sdvae.model.build import build_preset

# `sdvae ARGS` with every batch slowed down, so a test can kill the job between two shards.
SLOW_CLI = ("import sys, time; import sdvae.latents.encode_job as e; encode = e.encode_batch; "
            "e.encode_batch = lambda *a, **k: (time.sleep(0.4), encode(*a, **k))[1]; "
            "from sdvae.cli.main import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun(images: Path, tmp_path: Path) -> None:
    """kill -9 while a shard is half done, rerun: exactly one row per readable input, finished shards kept."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = ["encode-dataset", str(images), str(out), "--model", "test",
           "--resolution", "32", "--shard-size", "2", "--batch-size", "1", "--num-workers", "1", "--no-progress",
           "--dtype", "fp32"]  # compared with encode_small's fp32 rows (auto is bf16 on CPUs with native bf16)
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
    done = shard_stats(out)
    assert 2 <= len(done) < 6 and not (out / "sdvae_latents.json").exists() and not (out / "state.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "sdvae.cli", *cmd], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(done)} already done" in rerun.stdout and "complete: 10 rows" in rerun.stdout
    after = shard_stats(out)
    assert all(after[name] == stat for name, stat in done.items())
    assert not list((out / "data").glob(".*.tmp"))
    encode_small(images, ref, shard_size=2, batch_size=1)
    assert dataset_rows(out) == dataset_rows(ref)
    fit = json.loads((out / "sdvae_latents.json").read_text())["preview_rgb"]
    assert fit is not None and fit == json.loads((ref / "sdvae_latents.json").read_text())["preview_rgb"]


@pytest.mark.slow
def test_two_processes_match_one(images: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = [str(images), "--model", "test", "--resolution", "32", "--shard-size", "3", "--batch-size", "2",
              "--num-workers", "0", "--json", "--no-progress", "--dtype", "fp32"]  # as encode_small
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sdvae.cli"]
    proc = subprocess.run([*launcher, "encode-dataset", *common[:1], str(two), *common[1:]], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert sum(s["shards_encoded"] for s in summaries) == math.ceil(12 / 3)
    assert any(s["complete"] for s in summaries)
    encode_small(images, one, shard_size=3, batch_size=2)
    a, b = dataset_rows(one), dataset_rows(two)
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(a) == 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["mean"], y["mean"], atol=1e-5)
        np.testing.assert_allclose(x["logvar"], y["logvar"], atol=1e-5)
    fits = [json.loads((o / "sdvae_latents.json").read_text())["preview_rgb"] for o in (one, two)]
    np.testing.assert_allclose(fits[0]["weight"], fits[1]["weight"], atol=1e-4)


def test_latent_stats_exact_and_write_config(images: Path, tmp_path: Path, capsys) -> None:
    from sdvae.latents.stats import compute_latent_stats
    from sdvae.model.load import load_vae
    from sdvae.model.save import save_diffusers

    out = tmp_path / "out"
    encode_small(images, out, resolution=0)  # --crop none: rows of different shapes
    rows = dataset_rows(out)
    means = torch.cat([stored_latent(r, "mean").double().flatten(1) for r in rows], 1)  # (C, all positions)
    variances = torch.cat([stored_latent(r, "logvar").double().exp().flatten(1) for r in rows], 1)

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
    encode_small(images, out)
    assert main(["decode", str(out), "-o", str(dest), "--row", "2", "--row", "5", "--preview", "--model", "test",
                 "--dtype", "fp32"]) == 0  # compared with an fp32 decode below
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["row-000002.png", "row-000002.preview.png", "row-000005.png", "row-000005.preview.png"]
    assert Image.open(dest / "row-000002.png").size == (32, 32) == Image.open(dest / "row-000002.preview.png").size
    # The decoded row is the decoder's output for the stored mean.
    expected = Codec(build_preset("test")).decode(stored_latent(dataset_rows(out)[2], "mean")[None])
    got = torch.from_numpy(np.asarray(Image.open(dest / "row-000002.png"), dtype=np.float32) / 127.5 - 1)
    assert (got.permute(2, 0, 1) - expected[0].clamp(-1, 1)).abs().max() < 2 / 255 + 1e-6
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "p"), "--row", "0", "--preview-only"]) == 0
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["row-000000.preview.png"]
    assert main(["decode", str(out), "-o", str(dest), "--row", "99"]) == 2
    assert "no row 99 (the dataset has 10 rows)" in capsys.readouterr().err


def test_preview_uses_the_fitted_map_else_notes_arbitrary_colours(images: Path, tmp_path: Path, capsys) -> None:
    from sdvae.images.sources import open_source
    from sdvae.latents.export import crop_for_encoding
    from sdvae.latents.format import DATASET_META
    from sdvae.latents.preview import latent_preview, preview_rgb_map

    out = tmp_path / "out"
    encode_small(images, out)
    meta = json.loads((out / DATASET_META).read_text())
    fit = meta["preview_rgb"]
    assert np.array(fit["weight"]).shape == (4, 3) and len(fit["bias"]) == 3 and fit["cells"] == 10 * 4 * 4
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "p"), "--row", "3", "--preview-only"]) == 0
    assert "arbitrary" not in capsys.readouterr().err
    # The preview is the fitted map applied to the row's stored mean.
    z = stored_latent(dataset_rows(out)[3], "mean")
    expected = latent_preview(z, upscale=8, rgb_map=preview_rgb_map(meta["config"], fit))[0]
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "p" / "row-000003.preview.png"), dtype=np.float32) / 255)
    assert (got.permute(2, 0, 1) - expected).abs().max() < 1 / 255 + 1e-6
    # It is the least-squares map over every row (all shards) of the encoded pixels, area-averaged to latent
    # resolution, on the posterior means and a bias.
    source = open_source(str(images), "image", "train", None)
    xs, ys = [], []
    for row in dataset_rows(out):
        pixels = crop_for_encoding(source.load(row["index"]), 32, "center", 8)[0].double()
        ys.append(torch.nn.functional.avg_pool2d(pixels[None], 8)[0].flatten(1).T)
        xs.append(torch.cat([stored_latent(row, "mean").double().flatten(1), torch.ones(1, 16)]).T)
    solution = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution
    np.testing.assert_allclose(fit["weight"], solution[:4].numpy(), atol=1e-4)
    np.testing.assert_allclose(fit["bias"], solution[4].numpy(), atol=1e-4)
    # An older dataset (no fitted map) of a model outside SD's latent space: arbitrary colours, one note.
    (out / DATASET_META).write_text(json.dumps({**meta, "preview_rgb": None}))
    assert main(["decode", str(out), "-o", str(tmp_path / "q"), "--row", "3", "--row", "4", "--preview-only"]) == 0
    err = capsys.readouterr().err
    assert err.count("preview colours are arbitrary") == 1 and len(err.strip().splitlines()) == 1
    arbitrary = np.asarray(Image.open(tmp_path / "q" / "row-000003.preview.png"))
    assert not np.array_equal(arbitrary, np.asarray(Image.open(tmp_path / "p" / "row-000003.preview.png")))
