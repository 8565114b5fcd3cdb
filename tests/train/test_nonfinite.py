"""Non-finite steps: skipped on every optimizer (weights, Adam moments, BatchNorm buffers unchanged),
counted, and a streak of ``train.max_bad_steps`` stops the run with one line (exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crash_hook import Launcher
from helpers import REPO, make_photo
from sdvae.train.optim import optimizer_steps


def _params() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    layer = torch.nn.Linear(3, 2)
    return layer, torch.optim.AdamW(layer.parameters(), lr=0.1)


@pytest.mark.parametrize("bad", ["grad", "loss", "other_rank"])
def test_a_non_finite_step_changes_nothing(bad: str) -> None:
    layer, opt = _params()
    disc, disc_opt = _params()
    for p in [*layer.parameters(), *disc.parameters()]:
        p.grad = torch.ones_like(p)
    if bad == "grad":
        disc.weight.grad[0, 0] = float("nan")  # the discriminator's gradients count too
    before = [p.detach().clone() for p in [*layer.parameters(), *disc.parameters()]]
    result = optimizer_steps(None, opt, layer.parameters(), 1.0, disc_opt, loss_finite=bad != "loss",
                             agree=lambda ok: ok and bad != "other_rank")
    assert result.skipped
    assert all(torch.equal(p, b) for p, b in zip([*layer.parameters(), *disc.parameters()], before, strict=True))
    assert not opt.state and not disc_opt.state  # no Adam step counted
    ok = optimizer_steps(None, opt, layer.parameters(), 0.0, None)
    assert not ok.skipped and ok.grad_norm == pytest.approx(8**0.5) and opt.state


def test_fp16_scaler_skips_and_backs_off_once() -> None:
    layer, opt = _params()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(layer.weight.sum() * float("inf")).backward()
    before = layer.weight.detach().clone()
    result = optimizer_steps(scaler, opt, layer.parameters(), 1.0)
    assert result.skipped and torch.equal(layer.weight, before)
    assert scaler.get_scale() == 2.0**7  # one update(): backed off once


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nan_images")
    for i in range(12):
        Image.fromarray(make_photo(40 + i % 5, 36 + i % 3, seed=i)).save(root / f"{i:02d}.png")
    return root


def test_nan_batches_are_skipped_counted_and_a_streak_stops_the_run(images: Path, tmp_path: Path) -> None:
    """NaN posterior noise (tests/crash_hook.py SDVAE_TEST_NAN) at step 4, then steps 7-9: max_bad_steps=3
    stops at step 9 with one error line; the checkpoint inside the streak equals the one before it, and
    a rerun resumes from it with the counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SDVAE_TEST_"))}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    args = [REPO / "tools" / "train.py", REPO / "configs" / "test.yaml", f"--data.train={images}",
            f"--train.out={out}", "--train.steps=12", "--train.batch_size=2", "--train.grad_accum=1",
            "--loss.disc_weight=0.5", "--loss.disc_start=0", "--train.checkpoint_every=2", "--train.val_every=100",
            "--train.keep_checkpoints=0", "--log.with=none", "--log.every=1", "--train.max_bad_steps=3"]
    log = tmp_path / "run.log"
    with Launcher(env, REPO) as launcher:
        assert launcher.run(args, log, {"SDVAE_TEST_NAN": "3,6,7,8"}) == 2
        text = log.read_text()
        assert text.lower().count("error") == 1, text[-2000:]
        errors = [line for line in text.splitlines() if "error" in line]
        assert errors == ["train.py: error: 3 consecutive non-finite steps (train.max_bad_steps=3) at step 9; "
                          f"stopped, last checkpoint: {out / 'checkpoints' / 'step-00000008'}"], text[-2000:]
        assert "Traceback" not in text and not (out / "final").exists()
        six, eight = out / "checkpoints" / "step-00000006", out / "checkpoints" / "step-00000008"
        for name in ("vae", "loss", "ema", "optimizer-vae", "optimizer-disc"):  # loss: disc incl. BatchNorm
            a, b = load_file(six / f"{name}.safetensors"), load_file(eight / f"{name}.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a), name
        meta = json.loads((eight / "state.json").read_text())["meta"]
        assert (meta["skipped_steps"], meta["bad_streak"]) == (3, 2)
        assert json.loads((six / "state.json").read_text())["meta"]["bad_streak"] == 0
        # The last checkpoint loads: a rerun (a larger max_bad_steps is a free key) finishes from it.
        assert launcher.run([*args, "--train.max_bad_steps=20"], log) == 0, log.read_text()[-2000:]
    assert json.loads((out / "metrics.json").read_text())["skipped_steps"] == 3
