"""The commands with grayscale (1-channel) and RGBA (4-channel) VAEs, and the one line for other counts.

In process (``sdvae.cli.main.main``), so the tests can watch what the model is given; the models are the
micro `test` preset built with other channel counts and saved as diffusers folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import dataset_rows, make_photo, run_cli, stored_latent
from sdvae.cli.main import main
from sdvae.codec.codec import Codec
from sdvae.images.load import load_image
from sdvae.latents.export import EncodeOptions, crop_for_encoding, run_encode
from sdvae.latents.format import read_dataset_meta
from sdvae.model.build import build_preset
from sdvae.model.save import save_diffusers

MODE = {1: "L", 4: "RGBA"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("channel_models")
    return {c: save_diffusers(build_preset("test", image_channels=c), root / f"vae{c}") for c in (1, 2, 4)}


@pytest.fixture
def rgba_photo(tmp_path: Path) -> Path:
    """A 45×37 RGBA PNG whose top 10 rows are fully transparent and next 10 half transparent."""
    rgba = np.concatenate([make_photo(45, 37), np.full((37, 45, 1), 255, np.uint8)], axis=2)
    rgba[:10, :, 3], rgba[10:20, :, 3] = 0, 128
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every image batch given to a Codec to encode (what the model then receives, padded to multiples of 8)."""
    seen: list[torch.Tensor] = []
    original = Codec.encode

    def spy(self: Codec, images: torch.Tensor):
        seen.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(Codec, "encode", spy)
    return seen


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("channels", [1, 4])
def test_roundtrip_reads_and_writes_the_model_channels(channels, models, rgba_photo, tmp_path, encoded, capsys):
    out = tmp_path / "recon.png"
    code, stdout, err = _run(capsys, "roundtrip", str(rgba_photo), "-o", str(out), "--model", str(models[channels]),
                             "--dtype", "fp32", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert math.isfinite(result["psnr"]) and math.isfinite(result["ssim"])
    with Image.open(out) as recon, Image.open(result["comparison"]) as compare:
        assert recon.mode == MODE[channels] and recon.size == (45, 37) and compare.mode == "RGB"
    [given] = encoded
    assert given.shape == (1, channels, 37, 45)
    assert torch.equal(given, load_image(rgba_photo, channels=channels).tensor)
    with Image.open(rgba_photo) as src:
        alpha = np.asarray(src)[..., 3]
        grey = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, "white"), src).convert("L"))
    if channels == 4:  # the model got the alpha as its 4th channel
        torch.testing.assert_close(given[0, 3], torch.from_numpy(alpha / 127.5 - 1).float(), atol=1e-6, rtol=0)
    else:  # luminance of the image composited on white (in float, so within one 8-bit level of Pillow's)
        assert (given[0, 0] - torch.from_numpy(grey / 127.5 - 1)).abs().max() <= 1.01 / 127.5
        assert "RGB converted to grayscale (luminance)" in result["notes"]


@pytest.mark.parametrize("channels", [1, 4])
def test_encode_then_decode_equals_roundtrip(channels, models, rgba_photo, tmp_path, capsys):
    model = str(models[channels])
    latents, decoded = tmp_path / "z.safetensors", tmp_path / "decoded"
    assert _run(capsys, "encode", str(rgba_photo), "-o", str(latents), "--model", model, "--dtype", "fp32")[0] == 0
    code, stdout, err = _run(capsys, "decode", str(latents), "-o", str(decoded), "--model", model, "--dtype", "fp32")
    assert code == 0, err
    assert _run(capsys, "roundtrip", str(rgba_photo), "-o", str(tmp_path / "r.png"), "--model", model,
                "--dtype", "fp32")[0] == 0
    with Image.open(stdout.split()[0]) as dec, Image.open(tmp_path / "r.png") as rec:
        assert dec.mode == MODE[channels] and np.array_equal(np.asarray(dec), np.asarray(rec))


@pytest.mark.parametrize("channels", [1, 4])
def test_encode_dataset_rows_and_decode_row(channels, models, rgba_photo, tmp_path, capsys):
    src = rgba_photo.parent / "src"
    src.mkdir()
    Image.open(rgba_photo).save(src / "a.png")
    Image.fromarray(make_photo(40, 36, seed=3)).save(src / "b.png")
    out = tmp_path / "latents"
    summary = run_encode(EncodeOptions(src=str(src), out=str(out), model=str(models[channels]), resolution=32,
                                       dtype="fp32", progress=False))
    assert summary["complete"] and summary["rows"] == 2 and summary["skipped"] == 0
    codec = Codec(build_preset("test", image_channels=channels))
    for row, name in zip(dataset_rows(out), ("a.png", "b.png"), strict=True):
        with Image.open(src / name) as img:  # independent of sdvae's loader: Pillow's own conversions
            if channels == 1:  # alpha on white, then luminance
                grey = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("L")
                image = torch.from_numpy(np.asarray(grey) / 127.5 - 1).float()[None]
            else:
                image = torch.from_numpy(np.asarray(img.convert("RGBA")) / 127.5 - 1).float().permute(2, 0, 1)
        crop, _, box = crop_for_encoding(image, 32, "center", 8)
        assert row["shape"] == [4, 4, 4] and row["crop_box"] == box
        enc = codec.encode(crop[None])
        tolerance = 2e-2 if channels == 1 and name == "a.png" else 1e-4  # float vs 8-bit luminance
        torch.testing.assert_close(stored_latent(row, "mean"), enc.mean[0], atol=tolerance, rtol=0)
    meta = read_dataset_meta(out)
    assert f"{channels} channel" in meta["preprocessing"]["input_range"]
    assert np.asarray(meta["preview_rgb"]["weight"]).shape == (4, 3)  # fitted on the RGB view
    code, _, err = _run(capsys, "decode", str(out), "-o", str(tmp_path / "rows"), "--row", "1", "--preview",
                        "--model", str(models[channels]))
    assert code == 0, err
    with Image.open(tmp_path / "rows" / "row-000001.png") as img, \
            Image.open(tmp_path / "rows" / "row-000001.preview.png") as preview:
        assert img.mode == MODE[channels] and img.size == (32, 32) and preview.mode == "RGB"


@pytest.mark.parametrize("channels", [1, 4])
def test_eval_covers_all_channels(channels, models, rgba_photo, tmp_path, capsys):
    Image.fromarray(make_photo(40, 36, seed=3)).save(rgba_photo.parent / "b.png")
    code, stdout, err = _run(capsys, "eval", str(rgba_photo.parent), "--model", str(models[channels]), "--resolution",
                             "32", "--no-lpips", "--no-fid", "--workers", "0", "--dtype", "fp32", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["data"]["evaluated"] == 2 and report["model"]["image_channels"] == channels
    for key in ("psnr", "ssim"):
        assert math.isfinite(report["metrics"][key]["mean"]), key
    assert math.isfinite(report["metrics"]["elbo"]["elbo_bpd"]["mean"])
    assert report["protocol"]["bits_per_dim"] == f"-bound / ({channels}·H·W·ln 2)"
    assert f"{channels} channel" in report["protocol"]["channels"]


def test_other_channel_counts_are_one_line_naming_the_count(models, photo, tmp_path, capsys):
    model = str(models[2])
    commands = [
        ["roundtrip", str(photo), "-o", str(tmp_path / "r.png")],
        ["encode", str(photo), "-o", str(tmp_path / "z.safetensors")],
        ["sample", "-n", "1", "--size", "16", "-o", str(tmp_path / "s.png")],
        ["eval", str(photo.parent), "--no-lpips", "--no-fid", "--workers", "0"],
        ["encode-dataset", str(photo.parent), str(tmp_path / "ds"), "--resolution", "32"],
    ]
    for args in commands:
        code, stdout, err = _run(capsys, *args, "--model", model)
        assert code == 2 and stdout == "", args
        assert err.count("\n") == 1 and "model has 2 image channels" in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing written
    proc = run_cli("roundtrip", str(photo), "--model", model)  # as a user sees it
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sdvae: error: the model has 2 image channels; sdvae reads and writes images as 1 (grayscale), 3 (RGB) "
        "or 4 (RGBA) channels"]
