"""Conventions every command shares: `sdvae --version`, `python -m sdvae`, results on stdout and notes on
stderr, --json as a flag printing one object, and the one-line hint naming a missing pip extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdvae
from helpers import run_cli
from sdvae.cli.main import main
from sdvae.errors import UserError, require_extra


def test_version_and_python_dash_m_sdvae() -> None:
    proc = subprocess.run([sys.executable, "-m", "sdvae", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sdvae {sdvae.__version__}"
    proc = subprocess.run([sys.executable, "-m", "sdvae", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "roundtrip" in proc.stdout and "interpolate" in proc.stdout


@pytest.mark.slow
def test_notes_go_to_stderr_results_to_stdout(tmp_path: Path) -> None:
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent: "alpha composited on white" is a note
    src = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(src)
    proc = run_cli("roundtrip", str(src), "--model", "test", "-o", str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    assert "note:" in proc.stderr and "note:" not in proc.stdout and "PSNR" in proc.stdout
    proc = run_cli("roundtrip", str(src), "--model", "test", "-o", str(tmp_path / "r.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["notes"]  # exactly one JSON object on stdout, notes inside it


def test_require_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    require_extra("json", "anything")  # present: no error
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(UserError) as err:
        require_extra("torch_fidelity", "rFID in sdvae eval")
    assert str(err.value) == ("rFID in sdvae eval needs the optional package 'torch_fidelity', which is not "
                              "installed: pip install 'sdvae[eval]'")
    with pytest.raises(UserError, match=r"pip install 'sdvae\[data\]'"):
        require_extra("no_such_module_xyz", "x", extra="data")


@pytest.mark.parametrize(("hidden", "argv", "extra"), [
    ("torch_fidelity", ["eval", "{folder}", "--model", "test", "--no-lpips"], "eval"),
    ("lpips", ["eval", "{folder}", "--model", "test", "--no-fid"], "eval"),
    ("datasets", ["encode-dataset", "{folder}", "{out}", "--model", "test"], "data"),
    ("pyarrow", ["latent-stats", "{out}"], "data"),
])
def test_commands_missing_an_extra_say_which_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys, folder: Path,
                                                         tmp_path: Path, hidden: str, argv: list[str],
                                                         extra: str) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)
    argv = [a.format(folder=folder, out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdvae: error: ") and f"pip install 'sdvae[{extra}]'" in err[0]
