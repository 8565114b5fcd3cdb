"""tools/kl_sweep.py: its helpers (fast), and one tiny sweep end to end (slow, `test` preset, seconds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import REPO, load_tool, make_photo
from sdvae.errors import UserError
from sdvae.train.config import dump_config, load_config

SCRIPT = REPO / "tools" / "kl_sweep.py"
TEST_CONFIG = REPO / "configs" / "test.yaml"



kl_sweep = load_tool("kl_sweep")


@pytest.mark.parametrize(("weight", "label"), [
    (1e-6, "1e-6"), (1e-4, "1e-4"), (0.01, "1e-2"), (1.0, "1"), (1, "1"), (0.5, "0.5"), (0.1, "0.1"),
    (2.5e-5, "2.5e-5"), (100.0, "1e2"), (10.0, "10"), (1.5, "1.5"), (3e-10, "3e-10"),
])
def test_weight_label_is_short_and_exact(weight: float, label: str) -> None:
    assert kl_sweep.weight_label(weight) == label
    assert float(label) == weight  # one weight, one folder, however it was typed


def test_parse_weights_sorts_and_rejects_what_a_log_axis_cannot_show() -> None:
    assert kl_sweep.parse_weights("1, 1e-2,1e-6 ,1e-4") == [1e-6, 1e-4, 1e-2, 1.0]
    for bad, words in [("", "not a number"), ("1e-6,", "not a number"), ("a", "not a number"), ("0", "> 0"),
                       ("-1e-3", "> 0"), ("inf", "finite"), ("nan", "finite"), ("1e-2,0.01", "twice")]:
        with pytest.raises(UserError, match=words):
            kl_sweep.parse_weights(bad)


def test_run_folders_and_training_overrides() -> None:
    run = kl_sweep.run_dir(Path("runs/sweep"), 0.0001)
    assert run == Path("runs/sweep/kl-1e-4")
    assert kl_sweep.run_overrides(1e-4, run, "data/imgs", ["--train.steps=5"]) == [
        "--loss.kl_weight=1e-4", "--train.out=runs/sweep/kl-1e-4", "--data.train=data/imgs", "--train.steps=5"]
    # The labels read back through the config loader as the very same float (YAML 1.1 reads "1e-4" as a string).
    cfg = load_config(TEST_CONFIG, kl_sweep.run_overrides(1e-4, run, "data/imgs", []))
    assert cfg.loss.kl_weight == 1e-4 and cfg.train.out == "runs/sweep/kl-1e-4"


def test_overrides_of_the_swept_keys_are_refused() -> None:
    kl_sweep.check_overrides(["--train.steps=5", "--optim.lr", "1e-3"])
    for key, option in [("loss.kl_weight", "--weights"), ("train.out", "--out"), ("data.train", "--data")]:
        with pytest.raises(UserError, match=option):
            kl_sweep.check_overrides([f"--{key}=x"])
    with pytest.raises(UserError, match=r"section\.key"):
        kl_sweep.check_overrides(["--sample", "3"])  # a mistyped option is not passed on silently


def test_a_run_folder_of_another_recipe_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "kl-1e-6"
    kl_sweep.check_run_folder(run, load_config(TEST_CONFIG))  # nothing there yet: fine
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(TEST_CONFIG, ["--train.out=elsewhere"])))
    kl_sweep.check_run_folder(run, load_config(TEST_CONFIG))  # only train.out differs: the same run
    with pytest.raises(UserError, match=r"train\.steps=20"):
        kl_sweep.check_run_folder(run, load_config(TEST_CONFIG, ["--train.steps=21"]))


def test_without_matplotlib_the_plot_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rows = [{"kl_weight": 1e-6, "psnr_db": 20.0, "kl_bpd": 0.1}]
    with pytest.raises(UserError, match=r"pip install -e '\.\[docs\]'"):
        kl_sweep.plot_tradeoff(rows, tmp_path / "plot.png", "title")
    assert not (tmp_path / "plot.png").exists()


# --------------------------------------------------------------------------------------------------
# End to end: two weights of the `test` preset, 10 steps each, on generated images
# --------------------------------------------------------------------------------------------------

SAMPLES, SAMPLE_SIZE = 3, 32


def _sweep(tmp: Path, images: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--config", str(TEST_CONFIG), "--weights", "1e-6,1",
            "--data", str(images), "--eval-data", str(images), "--eval-resolution", "32", "--limit", "4",
            "--out", str(tmp / "runs"), "--docs", str(tmp / "docs"), "--samples", str(SAMPLES),
            "--sample-size", str(SAMPLE_SIZE), "--train.steps=10", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("kl_sweep")
    images = tmp / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(make_photo(40 + i % 5, 36 + i % 3, seed=i)).save(images / f"{i:02d}.png")
    proc = _sweep(tmp, images)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, images, proc


@pytest.mark.slow
def test_sweep_writes_every_figure(sweep: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    tmp, _, _ = sweep
    docs = tmp / "docs"
    assert sorted(p.name for p in docs.iterdir()) == ["README.md", "kl_sweep.json", "kl_sweep.png",
                                                      "prior_samples.png"]
    summary = json.loads((docs / "kl_sweep.json").read_text())
    assert summary["format"] == "sdvae-kl-sweep/1"
    assert summary["command"].startswith("python tools/kl_sweep.py --config ")
    assert summary["weights"] == [1e-6, 1.0]
    table = {row["label"]: row for row in summary["table"]}
    assert list(table) == ["1e-6", "1"]
    for row in table.values():
        assert row["images"] == 4
        for key in ("psnr_db", "kl_bpd", "kl_mc_bpd", "elbo_bpd", "distortion_bpd"):
            assert math.isfinite(row[key]), (key, row)
        assert row["kl_bpd"] > 0 and row["elbo_bpd"] > 0
    # Each run really got its weight (the two runs are otherwise identical, down to the data order and
    # the posterior noise): the resolved config says so, and the KL term did pull the rate down. The
    # margin after 10 steps is 10-30% on every seed and loss tried, far above float noise; a weight that
    # did not reach train.py would give two identical runs and fail the strict inequality.
    for label in table:
        recorded = yaml.safe_load((tmp / "runs" / f"kl-{label}" / "config.yaml").read_text())
        assert recorded["loss"]["kl_weight"] == float(label)
    assert table["1"]["kl_bpd"] < table["1e-6"]["kl_bpd"]
    assert [run["train_command"].split()[1] for run in summary["runs"]] == ["tools/train.py"] * 2
    assert summary["protocol"]["evaluation"]["resolution"] == 32
    assert summary["protocol"]["samples"]["space"] == "vae"

    with Image.open(docs / "prior_samples.png") as grid:  # labelled_rows: one row per weight
        assert grid.height == 2 * (SAMPLE_SIZE + 2) + 2
        assert grid.width > SAMPLES * (SAMPLE_SIZE + 2)
    with Image.open(docs / "kl_sweep.png") as plot:
        assert plot.format == "PNG" and plot.size == (960, 630)  # 6.4 x 4.2 inches at 150 dpi
    readme = (docs / "README.md").read_text()
    assert summary["command"] in readme
    assert "![PSNR and KL rate against the KL weight](kl_sweep.png)" in readme
    assert "](prior_samples.png)" in readme
    assert f"| 1e-6 | {table['1e-6']['psnr_db']:.2f} | {table['1e-6']['kl_bpd']:.3g} |" in readme


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_refuses_another_recipe(
        sweep: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    tmp, images, _ = sweep
    before = json.loads((tmp / "docs" / "kl_sweep.json").read_text())["table"]
    again = _sweep(tmp, images)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("exists, not training again") == 2
    assert json.loads((tmp / "docs" / "kl_sweep.json").read_text())["table"] == before  # evaluation is seeded

    changed = _sweep(tmp, images, "--train.steps=11")
    assert changed.returncode == 2
    assert "was trained with train.steps=10" in changed.stderr and "Traceback" not in changed.stderr
