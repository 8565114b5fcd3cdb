"""sdvae eval / sample / interpolate from the command line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from helpers import make_photo, run_cli


@pytest.mark.slow
def test_cli_eval_writes_json_and_markdown(folder, tmp_path):
    out = tmp_path / "report.json"
    common = ("eval", str(folder), "--model", "test", "--resolution", "32", "--iw", "2", "--workers", "0",
              "--no-lpips", "--no-fid", "--device", "cpu")
    result = run_cli(*common, "--markdown", "--json-out", str(out))
    assert result.returncode == 0, result.stderr
    assert "PSNR" in result.stdout and "ELBO" in result.stdout and "1 skipped" in result.stdout
    assert "| Model | Data | Resolution |" in result.stdout and "| test | data | 32² center crop | 3 |" in result.stdout
    assert f"note: wrote {out}" in result.stderr and "wrote" not in result.stdout  # notes on stderr
    data = json.loads(out.read_text())
    assert data["format"] == "sdvae-eval/1" and data["data"]["skipped"] == 1
    assert data["metrics"]["elbo"]["iw_bpd"]["mean"] <= data["metrics"]["elbo"]["elbo_bpd"]["mean"]
    # --json is a flag, as for every other command: stdout is exactly one JSON object.
    result = run_cli(*common, "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["format"] == "sdvae-eval/1" and printed["metrics"]["psnr"] == data["metrics"]["psnr"]


@pytest.mark.slow
def test_cli_sample_and_interpolate(tmp_path):
    grid = tmp_path / "grid.png"
    result = run_cli("sample", "--model", "test", "-n", "5", "--size", "16", "-o", str(grid), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)
    again = tmp_path / "again.png"
    assert run_cli("sample", "--model", "test", "-n", "5", "--size", "16", "-o", str(again), "--seed", "3"
                   ).returncode == 0
    assert grid.read_bytes() == again.read_bytes()

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(make_photo(24, 16, seed=0)).save(a)
    Image.fromarray(make_photo(30, 30, seed=1)).save(b)
    strip = tmp_path / "strip.png"
    result = run_cli("interpolate", str(a), str(b), "--model", "test", "-n", "4", "-o", str(strip))
    assert result.returncode == 0, result.stderr
    assert "note: b.png resized from 30x30" in result.stderr and "note:" not in result.stdout
    assert Image.open(strip).height > 2 * 18 + 2  # two 16-pixel rows under a band of t labels


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_2(tmp_path, folder):
    a = tmp_path / "a.png"
    Image.fromarray(make_photo(16, 16)).save(a)
    cases = [
        (("eval", str(tmp_path / "missing"), "--model", "test"), "missing"),
        (("eval", str(folder), "--model", "test", "--iw", "0"), "--iw"),
        (("eval", str(folder), "--model", "test", "--sigma", "wide"), "--sigma"),
        (("sample", "--model", "test", "-o", str(tmp_path / "grid.txt")), "unknown image extension"),
        (("sample", "--model", "test", "--size", "20", "-o", str(tmp_path / "g.png")), "multiple"),
        (("interpolate", str(a), str(tmp_path / "nope.png"), "--model", "test", "-o", str(tmp_path / "s.png")),
         "nope.png"),
        (("interpolate", str(a), str(a), "--model", "test", "-o", str(a)), "refusing to overwrite"),
    ]
    for args, needle in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sdvae: error: ") and needle in lines[0], (args, lines)


@pytest.mark.slow
def test_cli_eval_diffusability_json(folder):
    result = run_cli("eval", str(folder), "--model", "test", "--resolution", "32", "--workers", "0", "--no-lpips",
                     "--no-fid", "--device", "cpu", "--diffusability", "--json")
    assert result.returncode == 0, result.stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the JSON")  # NaN/Infinity are not JSON

    data = json.loads(result.stdout, parse_constant=no_constants)
    section = data["metrics"]["diffusability"]
    assert section["available"] and set(section["equivariance"]) == {
        "scale_0.5", "scale_0.75", "rotate_90", "flip_horizontal"}
    assert 0 < section["spectrum"]["latent"]["upper_share"]["mean"] < 1
    assert section["statistics"]["max_abs_correlation"] >= 0
    assert set(data["protocol"]["diffusability"]) == {"spectrum", "equivariance", "statistics"}
    assert all("gap_rotate_90" in row for row in data["per_image"])
