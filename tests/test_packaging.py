"""The package as users install it: the wheel carries the default model and runs from anywhere, and
installing sdvae keeps the torch an environment already has (pyproject has ranges, not pins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_photo

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def _venv_on_this_environment(path: Path) -> Path:
    """A fresh venv whose other packages come from this environment (a .pth line, after its own site)."""
    _run(sys.executable, "-m", "venv", path)
    python = path / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_this_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", REPO, "-w", out)
    (found,) = out.glob("sdvae-*.whl")
    return found


def test_pyproject_pins_no_torch() -> None:
    import re

    text = (REPO / "pyproject.toml").read_text()
    torchy = re.findall(r'"(torch(?:vision)?\s*[<>=!~][^"]*)"', text)
    assert torchy and not any("==" in d for d in torchy), torchy


@pytest.mark.slow
def test_wheel_runs_roundtrip_with_the_default_model_from_another_folder(wheel: Path, tmp_path: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "sdvae/checkpoints/sdvae-tiny-f8c4/diffusion_pytorch_model.safetensors" in names
    assert "sdvae/py.typed" in names  # PEP 561: type checkers read the installed package's annotations
    python = _venv_on_this_environment(tmp_path / "env")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(make_photo(45, 37)).save(elsewhere / "photo.png")
    where = _run(python, "-c", "import sdvae; print(sdvae.__file__)", cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "env"), where  # the wheel's copy, not the checkout
    proc = _run(tmp_path / "env" / "bin" / "sdvae", "roundtrip", "photo.png", "--json", cwd=elsewhere)
    result = json.loads(proc.stdout)
    assert Path(result["model"]).is_relative_to(tmp_path / "env") and result["psnr"] > 15
    assert (elsewhere / "photo.recon.png").is_file()
    assert _run(python, "-m", "sdvae", "--version", cwd=elsewhere).stdout.startswith("sdvae ")


@pytest.mark.slow
def test_install_keeps_the_torch_an_environment_has(wheel: Path, tmp_path: Path) -> None:
    python = _venv_on_this_environment(tmp_path / "env")
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # Another torch release, as pip sees it (metadata only; found before this environment's torch).
    other = site / "torch-2.11.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    (other / "INSTALLER").write_text("pip\n")
    (other / "RECORD").write_text("")
    report = tmp_path / "report.json"
    # --no-index: a pinned torch would have to be fetched, and the resolution would fail.
    _run(python, "-m", "pip", "install", "--dry-run", "--no-index", "--report", report, wheel)
    installs = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert installs == {"sdvae": installs["sdvae"]}, installs  # nothing else, torch least of all
