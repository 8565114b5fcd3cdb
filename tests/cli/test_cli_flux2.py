"""FLUX.2 VAEs through the commands (in-process, the small FLUX.2-shaped model of flux2_helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux2_helpers import small_flux2, small_flux2_folder
from helpers import make_photo
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.images.load import load_image
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.scaling import unscale_latents
from sdvae.model.load import load_vae


@pytest.fixture
def flux2_setup(tmp_path: Path) -> tuple[Path, Path]:
    """(a small FLUX.2 diffusers folder, a folder of five 32x32 photos)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(make_photo(32, 32, seed=i)).save(images / f"{i}.png")
    return small_flux2_folder(tmp_path / "vae"), images


def test_info_shows_family_and_normalisation(capsys) -> None:
    assert main(["info", "flux2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"].startswith("FLUX.2") and facts["latent_channels"] == 32
    assert "2x2 patchify to 128 channels" in facts["latent_normalization"]
    assert facts["scaled_latent_shape"] == [128, "H/16", "W/16"]


def test_encode_dataset_latent_dataset_unscale_decode_equals_direct_roundtrip(flux2_setup, tmp_path: Path) -> None:
    """encode-dataset records the BatchNorm statistics, so LatentDataset scales without the model, exactly."""
    model, images = flux2_setup
    out = tmp_path / "latents"
    assert main(["encode-dataset", str(images), str(out), "--model", str(model), "--resolution", "32",
                 "--device", "cpu", "--dtype", "fp32", "--num-workers", "0", "--no-progress"]) == 0
    meta = json.loads((out / "sdvae_latents.json").read_text())
    assert meta["scaling"]["family"] == "flux2" and len(meta["scaling"]["bn_running_mean"]) == 32
    data = LatentDataset(out, sample=False)
    item = data[2]
    assert item["latent"].shape == (32, 2, 2)  # 4C channels at H/16
    codec = Codec(load_vae(model), tile="off")
    decoded = codec.decode(unscale_latents(item["latent"][None], data.scaling))
    image = load_image(images / item["key"]).tensor
    direct, _ = codec.roundtrip(image)
    torch.testing.assert_close(decoded, direct, rtol=0, atol=1e-5)


def test_latent_stats_write_config_normalises_the_data_it_measured(flux2_setup, tmp_path: Path, capsys) -> None:
    model, images = flux2_setup
    out = tmp_path / "latents"
    assert main(["encode-dataset", str(images), str(out), "--model", str(model), "--resolution", "32",
                 "--device", "cpu", "--dtype", "fp32", "--num-workers", "0", "--no-progress"]) == 0
    config_before = (model / "config.json").read_text()
    capsys.readouterr()
    assert main(["latent-stats", str(out), "--over", "mean", "--write-config", str(model)]) == 0
    printed = capsys.readouterr().out
    assert "BatchNorm buffers, not config.json" in printed and "32 2x2-patchified (FLUX.2) channels" in printed
    assert (model / "config.json").read_text() == config_before  # a key diffusers would ignore: none written
    scaled = torch.stack([item["latent"] for item in LatentDataset(out, sample=False, scaling=model)])
    per_channel = scaled.transpose(0, 1).reshape(32, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-4)
    vae = load_vae(model)  # the rewritten folder still loads exactly, with the new statistics
    assert not torch.equal(vae.bn.running_mean, small_flux2().bn.running_mean)
    # std = sqrt(var / (var + batch_norm_eps)): 1 up to FLUX.2's eps 1e-4 (this random model's latents have
    # variances down to about 3e-3, so here "1" is within 2 %)
    var = vae.bn.running_var.double()
    torch.testing.assert_close(per_channel.std(1, unbiased=False), (var / (var + 1e-4)).sqrt(), rtol=0, atol=1e-4)
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 0.05


@pytest.mark.parametrize("args, problem", [
    (["--resolution", "40"], "--resolution 40 is not a multiple of the downsampling factor 16"),
    (["--buckets", "64", "--bucket-step", "24"], "--bucket-step 24 is not a multiple of the downsampling factor 16"),
])
def test_sizes_not_multiple_of_16_one_line_nothing_written(flux2_setup, tmp_path: Path, capsys, args, problem) -> None:
    model, images = flux2_setup
    out = tmp_path / "latents"
    assert main(["encode-dataset", str(images), str(out), "--model", str(model), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1
    assert not out.exists()


def test_roundtrip_encode_decode_sample_interpolate(flux2_setup, tmp_path: Path, capsys) -> None:
    model, images = flux2_setup
    common = ["--model", str(model), "--device", "cpu"]
    photo = images / "0.png"
    assert main(["roundtrip", str(photo), "-o", str(tmp_path / "r.png"), *common]) == 0
    assert main(["encode", str(photo), "-o", str(tmp_path / "l.safetensors"), *common]) == 0
    assert main(["decode", str(tmp_path / "l.safetensors"), "-o", str(tmp_path / "dec"), "--preview", *common]) == 0
    assert main(["sample", "-n", "2", "--size", "32", "-o", str(tmp_path / "s.png"), *common]) == 0
    assert main(["interpolate", str(photo), str(images / "1.png"), "-n", "3", "-o", str(tmp_path / "i.png"),
                 *common]) == 0
    capsys.readouterr()
    assert main(["eval", str(images), "--limit", "2", "--no-lpips", "--no-fid", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["latent_channels"] == 8
    assert main(["sample", "-n", "1", "--size", "40", "-o", str(tmp_path / "bad.png"), *common]) == 2
    assert "multiple of the model's downsampling factor 16" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
    for name in ("r.png", "s.png", "i.png", "dec/0.00000.png", "dec/0.00000.preview.png"):
        assert (tmp_path / name).is_file(), name


def test_buckets_follow_the_factor_16_and_latent_dataset_serves_patchified_shapes(flux2_setup, tmp_path: Path,
                                                                                   capsys) -> None:
    model, _ = flux2_setup
    images = tmp_path / "wide"
    images.mkdir()
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48), (80, 40)]):
        Image.fromarray(make_photo(w, h, seed=i)).save(images / f"{i}.png")
    out = tmp_path / "buckets"
    assert main(["encode-dataset", str(images), str(out), "--model", str(model), "--buckets", "48", "--device",
                 "cpu", "--dtype", "fp32", "--num-workers", "0", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bucket_set"]["step"] == 16  # the default step, rounded to FLUX.2's factor 16
    data = LatentDataset(out, sample=False)
    shapes = data.shapes()
    assert len(set(shapes)) > 1
    for i, shape in enumerate(shapes):
        assert data[i]["latent"].shape == shape and shape[0] == 32
