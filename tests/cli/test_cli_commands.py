"""End-to-end CLI tests via subprocess, on images the tests generate (including bad ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_photo, run_cli
from sdvae.metrics.pixel import psnr, ssim

pytestmark = pytest.mark.slow


def _pixels(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def _auto_dtype_expected(device: str) -> str:
    """What ``--dtype auto`` must pick here, from torch's own hardware report (not sdvae's detector):
    bf16 on a CPU with AVX512-BF16 or AMX, or on a GPU of compute capability 8.0+, else fp32."""
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.get_device_capability(torch.device(device))[0] >= 8 else "fp32"
    caps = torch.cpu.get_capabilities()
    return "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "fp32"


def test_roundtrip_json_outputs_and_metrics(photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "recon.png"
    proc = run_cli("roundtrip", str(photo), "-o", str(out), "--model", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == str(out) and Path(result["comparison"]).is_file()
    assert result["latent_shape"] == [4, 5, 6]  # 37x45 padded to 40x48, /8
    assert Image.open(out).size == Image.open(photo).size == (45, 37)
    assert Image.open(result["comparison"]).size[0] > 2 * 45
    # The printed metrics are those of the written file against the input.
    a, b = _pixels(photo), _pixels(out)
    assert result["psnr"] == pytest.approx(float(psnr(a, b)[0]), abs=1e-3)
    assert result["ssim"] == pytest.approx(float(ssim(a, b)[0]), abs=1e-4)
    assert result["seconds"] > 0
    assert result["dtype"] == _auto_dtype_expected(result["device"])  # the default is auto
    forced = json.loads(run_cli("roundtrip", str(photo), "-o", str(out), "--model", "test", "--json",
                                "--dtype", "bf16").stdout)
    assert forced["dtype"] == "bf16"


def test_roundtrip_default_output_and_text(photo: Path) -> None:
    proc = run_cli("roundtrip", str(photo), "--model", "test", "--sample", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "PSNR" in proc.stdout and "SSIM" in proc.stdout
    assert (photo.parent / "photo.recon.png").is_file() and (photo.parent / "photo.recon.compare.png").is_file()


def test_roundtrip_never_overwrites_input(photo: Path) -> None:
    before = photo.read_bytes()
    proc = run_cli("roundtrip", str(photo), "-o", str(photo), "--model", "test")
    assert proc.returncode != 0 and str(photo) in proc.stderr
    _no_traceback(proc)
    assert photo.read_bytes() == before


def test_default_model_without_embedded_checkpoint_says_pass_model(monkeypatch, tmp_path: Path) -> None:
    from sdvae.cli import options as cli_args
    from sdvae.errors import UserError

    monkeypatch.setattr(cli_args, "EMBEDDED", tmp_path / "no-checkpoint")
    with pytest.raises(UserError, match="pass --model"):
        cli_args.default_model()


def test_embedded_checkpoint_ships_within_budget_and_is_the_default(photo: Path, tmp_path: Path) -> None:
    from sdvae.cli.options import EMBEDDED, default_model

    weights = EMBEDDED / "diffusion_pytorch_model.safetensors"
    assert (EMBEDDED / "config.json").is_file() and weights.is_file(), f"{EMBEDDED} is missing"
    assert sum(f.stat().st_size for f in EMBEDDED.iterdir()) <= 20 * 1024**2
    assert default_model() == str(EMBEDDED)
    from sdvae.model.presets import PRESETS

    shipped = json.loads((EMBEDDED / "config.json").read_text())
    # The `tiny` preset is the embedded checkpoint's architecture, possibly grown by `model.layers_per_block`.
    arch = {k: v for k, v in PRESETS["tiny"].config.items()
            if k not in ("scaling_factor", "sample_size", "layers_per_block")}
    assert {k: shipped[k] for k in arch} == arch
    assert shipped["layers_per_block"] >= PRESETS["tiny"].config["layers_per_block"]
    psnrs = {}
    for name, extra in (("embedded", []), ("untrained", ["--model", "tiny"])):  # same architecture, random init
        proc = run_cli("roundtrip", str(photo), "-o", str(tmp_path / f"{name}.png"), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["latent_shape"][0] == 4
        psnrs[name] = result["psnr"]
    assert psnrs["embedded"] > psnrs["untrained"] + 3, psnrs  # trained weights, not a preset's random init


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp / "missing.png"
    (tmp / "empty.png").write_bytes(b"")
    files["empty"] = tmp / "empty.png"
    Image.fromarray(make_photo(64, 64)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    files["truncated"] = tmp / "truncated.png"
    (tmp / "notes.png").write_text("this is not an image\n")
    files["text"] = tmp / "notes.png"
    Image.fromarray(make_photo(4, 4)).save(tmp / "tiny.png")
    files["smaller than a latent cell"] = tmp / "tiny.png"
    return files


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text", "smaller than a latent cell"])
def test_bad_inputs_one_line_error(tmp_path: Path, case: str) -> None:
    path = _bad_inputs(tmp_path)[case]
    proc = run_cli("roundtrip", str(path), "--model", "test")
    assert proc.returncode != 0
    _no_traceback(proc)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and path.name in lines[0], proc.stderr
    assert not list(tmp_path.glob("*.recon*"))


def _odd_inputs(tmp: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    rgb = make_photo(40, 24)
    out = {}
    Image.fromarray((rgb.astype(np.uint16) * 257)[..., 0]).save(tmp / "gray16.png")
    out["16-bit"] = (tmp / "gray16.png", (40, 24))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp / "palette.png")
    out["palette"] = (tmp / "palette.png", (40, 24))
    rgba = np.concatenate([rgb, np.full((24, 40, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp / "alpha.png")
    out["alpha"] = (tmp / "alpha.png", (40, 24))
    Image.fromarray(rgb).convert("L").save(tmp / "gray.png")
    out["grayscale"] = (tmp / "gray.png", (40, 24))
    Image.fromarray(rgb).convert("CMYK").save(tmp / "cmyk.jpg")
    out["cmyk"] = (tmp / "cmyk.jpg", (40, 24))
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp / "rotated.jpg", exif=exif)
    out["exif"] = (tmp / "rotated.jpg", (24, 40))
    return out


@pytest.mark.parametrize("case", ["16-bit", "palette", "alpha", "grayscale", "cmyk", "exif"])
def test_odd_inputs_give_correct_outputs(tmp_path: Path, case: str) -> None:
    path, size = _odd_inputs(tmp_path)[case]
    out = tmp_path / f"{case}.out.png"
    proc = run_cli("roundtrip", str(path), "-o", str(out), "--model", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc)
    assert Image.open(out).size == size and Image.open(out).mode == "RGB"


def test_decompression_bomb_refused_with_hint(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (13500, 13500)).save(bomb)  # 182 Mpx: above Pillow's 2x89.5 Mpx hard limit
    proc = run_cli("roundtrip", str(bomb), "--model", "test")
    assert proc.returncode != 0 and "bomb.png" in proc.stderr and "--tile on" in proc.stderr
    _no_traceback(proc)


def test_encode_decode_matches_roundtrip(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(make_photo(45, 37, seed=1)).save(a)
    Image.fromarray(make_photo(24, 32, seed=2)).save(b)
    lat = tmp_path / "lat.safetensors"
    proc = run_cli("encode", str(a), str(b), "-o", str(lat), "--model", "test")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("decode", str(lat), "-o", str(tmp_path / "dec"))  # model taken from the file's metadata
    assert proc.returncode == 0, proc.stderr
    decoded = sorted((tmp_path / "dec").glob("*.png"))
    assert [p.name for p in decoded] == ["a.00000.png", "b.00001.png"]
    proc = run_cli("roundtrip", str(a), "-o", str(tmp_path / "a.rt.png"), "--model", "test")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(decoded[0])), np.asarray(Image.open(tmp_path / "a.rt.png")))
    assert Image.open(decoded[1]).size == (24, 32)
    # A model with another config is refused by config hash.
    proc = run_cli("decode", str(lat), "-o", str(tmp_path / "dec2"), "--model", "tiny")
    assert proc.returncode != 0 and "config hash" in proc.stderr
    _no_traceback(proc)


def test_convert_both_ways_and_info(tmp_path: Path) -> None:
    folder, ldm, back = tmp_path / "diffusers", tmp_path / "vae.safetensors", tmp_path / "back"
    assert run_cli("convert", "test", str(folder), "--to", "diffusers").returncode == 0
    assert run_cli("convert", str(folder), str(ldm), "--to", "ldm").returncode == 0
    proc = run_cli("convert", str(ldm), str(back), "--to", "diffusers", "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    infos = []
    for ref in ("test", str(folder), str(ldm)):
        proc = run_cli("info", ref, "--json")
        assert proc.returncode == 0, proc.stderr
        infos.append(json.loads(proc.stdout))
    assert infos[0]["parameters"] == infos[1]["parameters"] == infos[2]["parameters"]
    assert infos[1]["downsampling_factor"] == 8 and infos[1]["latent_channels"] == 4
    proc = run_cli("info", "test")
    assert "parameters" in proc.stdout and "scaling_factor" in proc.stdout
    proc = run_cli("convert", "test", str(folder), "--to", "diffusers")  # exists, no --force
    assert proc.returncode != 0 and "--force" in proc.stderr
    _no_traceback(proc)


@pytest.mark.parametrize(("tile", "bounded"), [("on", True), ("off", False)])
def test_roundtrip_of_an_image_that_tiles_runs_with_bounded_memory(photo: Path, tmp_path: Path, monkeypatch,
                                                                  tile: str, bounded: bool) -> None:
    import contextlib

    from sdvae.cli import main as cli_main
    from sdvae.cli import roundtrip

    entered: list[str] = []

    @contextlib.contextmanager
    def recording():
        entered.append("bounded")
        yield

    monkeypatch.setattr(roundtrip, "bounded_memory", recording)
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: False)  # this test process keeps glibc's default
    assert cli_main.main(["roundtrip", str(photo), "-o", str(tmp_path / "r.png"), "--model", "test",
                          "--tile", tile]) == 0
    assert entered == (["bounded"] if bounded else [])
