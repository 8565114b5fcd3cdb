"""Every hostile weights input (tests/hostile_weights.py) through every entry point that loads a model.

The library (``load_vae``), ``sdvae info``, ``sdvae convert`` (both targets), ``sdvae roundtrip --model`` and
training's ``model.init`` must each refuse it with one line naming the input and the problem (exit 2 for
commands), use no partial model, and write nothing. In-process here; a few pairs also run through the real
console scripts (slow).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_tool, save_photo
from hostile_weights import PROBLEMS, write_corpus
from sdvae.errors import UserError

ENTRY_POINTS = ("load_vae", "info", "convert-diffusers", "convert-ldm", "roundtrip", "train")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def train_tool():
    return load_tool("train")


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_entry(entry: str, ref: Path, work: Path, capsys: pytest.CaptureFixture, train_tool) -> str:
    """Run one entry point on ``ref`` inside ``work``; the one-line error it gave."""
    from sdvae.cli.main import main
    from sdvae.model.load import load_vae

    if entry in ("load_vae", "train"):
        with pytest.raises(UserError) as err:
            if entry == "load_vae":
                load_vae(ref)
            else:
                from sdvae.train.config import load_config

                cfg = load_config(REPO / "configs" / "test.yaml",
                                  [f"--model.init={ref}", f"--train.out={work / 'run'}",
                                   f"--data.train={work / 'images'}"])
                train_tool.main(cfg)
        return str(err.value)
    argv = {
        "info": ["info", str(ref)],
        "convert-diffusers": ["convert", str(ref), str(work / "out"), "--to", "diffusers"],
        "convert-ldm": ["convert", str(ref), str(work / "out.safetensors"), "--to", "ldm"],
        "roundtrip": ["roundtrip", str(work / "images" / "photo.png"), "--model", str(ref),
                      "-o", str(work / "recon.png"), "--dtype", "fp32"],
    }[entry]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == "" and err.startswith("sdvae: error: ") and err.count("\n") == 1, err
    return err.removeprefix("sdvae: error: ").strip()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hostile_input_is_refused_everywhere(corpus: dict[str, Path], name: str, entry: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, train_tool) -> None:
    ref = corpus[name]
    save_photo(tmp_path / "images" / "photo.png", 40, 32, seed=0)
    before = _snapshot(tmp_path)
    message = _run_entry(entry, ref, tmp_path, capsys, train_tool)
    assert "\n" not in message and str(ref) in message, message
    assert PROBLEMS[name] in message.lower(), message
    assert _snapshot(tmp_path) == before  # no output, no temporary left behind
    assert not (ref.parent / "PWNED").exists()  # the pickle's payload never ran


def test_corpus_folders_load_once_their_one_defect_is_undone(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The folder refusals are about the defect: the same folders with it undone load."""
    import json

    from safetensors.torch import load_file, save_file

    from sdvae.model.load import load_vae

    weights = load_file(corpus["folder_extra_keys"] / "diffusion_pytorch_model.safetensors")
    del weights["decoder.extra_head.weight"]
    for name in ("folder_missing_keys", "folder_extra_keys", "folder_config_channels"):
        folder = shutil.copytree(corpus[name], tmp_path / name)
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 4}))
        assert load_vae(folder).config.latent_channels == 4


# (input, command line) pairs run through the installed console scripts: exit code and stderr as a user sees them.
SUBPROCESS_CASES = [
    ("truncated.safetensors", "info"),
    ("folder_missing_keys", "convert"),
    ("unsafe_global.ckpt", "roundtrip"),
    ("offsets_overlap.safetensors", "train"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "entry"), SUBPROCESS_CASES)
def test_hostile_input_through_the_console_scripts(corpus: dict[str, Path], name: str, entry: str,
                                                   tmp_path: Path) -> None:
    ref = str(corpus[name])
    save_photo(tmp_path / "images" / "photo.png", 40, 32, seed=0)
    before = _snapshot(tmp_path)
    sdvae = shutil.which("sdvae", path=str(Path(sys.executable).parent)) or shutil.which("sdvae")
    cli = [sdvae] if sdvae else [sys.executable, "-m", "sdvae.cli"]
    argv = {
        "info": [*cli, "info", ref],
        "convert": [*cli, "convert", ref, str(tmp_path / "out"), "--to", "diffusers"],
        "roundtrip": [*cli, "roundtrip", str(tmp_path / "images" / "photo.png"), "--model", ref,
                      "-o", str(tmp_path / "recon.png")],
        "train": [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "configs" / "test.yaml"),
                  f"--model.init={ref}", f"--train.out={tmp_path / 'run'}", f"--data.train={tmp_path / 'images'}"],
    }[entry]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and ref in lines[0] and PROBLEMS[name] in lines[0].lower(), proc.stderr
    assert _snapshot(tmp_path) == before
