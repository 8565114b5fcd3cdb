"""Kill tools/train.py at seeded random moments, rerun the same command each time, and compare every file
the run wrote with an uninterrupted run's: bit-identical tensors (VAE, EMA, both optimizers, the
discriminator's BatchNorm buffers, schedulers, RNG states), state.json, final/ and metrics.json.

Kills come from ``tests/crash_hook.py`` (``SDVAE_TEST_KILL=MOMENT:N``, SIGKILL of the process group, so
the DataLoader workers die too). Runs go through its fork server: the dozen runs of a test then share
one interpreter start-up (the same code runs as ``python tools/train.py``; test_train_run.py covers that).

Every run also draws from the global torch, numpy and Python generators on each micro-batch
(``SDVAE_TEST_GLOBAL_RNG=1``), so a resume that failed to restore one of them changes the weights;
training itself draws nothing from them, and without the draws their states would match anyway.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crash_hook import Launcher
from helpers import REPO, make_photo

TRAIN = REPO / "tools" / "train.py"
CONFIG = REPO / "configs" / "test.yaml"
STEPS = 16
# grad_accum 2, discriminator (BatchNorm) from step 3, EMA, 2 workers, a checkpoint every 3 steps (all kept).
COMMON = (f"--train.steps={STEPS}", "--train.batch_size=2", "--train.grad_accum=2", "--loss.disc_weight=0.5",
          "--loss.disc_start=3", "--data.num_workers=2", "--train.checkpoint_every=3", "--train.val_every=5",
          "--train.keep_checkpoints=0", "--log.with=none", "--log.every=4", "--optim.schedule=cosine",
          "--optim.warmup_steps=2", "--loss.learned_logvar=true")
# Upper bounds of N per moment for one kill (a kill should land before the run ends).
MOMENTS = {"accum": 3, "step": 2, "ckpt": 6, "val": 1}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash_images")
    for i in range(16):
        Image.fromarray(make_photo(40 + i % 5, 36 + i % 3, seed=i)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def launcher():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SDVAE_TEST_"))}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with Launcher(env, REPO) as server:
        yield server


def _train(launcher: Launcher, images: Path, out: Path, kill: str = "") -> int:
    env = {"SDVAE_TEST_GLOBAL_RNG": "1"} | ({"SDVAE_TEST_KILL": kill} if kill else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    return launcher.run([TRAIN, CONFIG, f"--data.train={images}", f"--train.out={out}", *COMMON],
                        log=out.parent / f"{out.name}.log", env=env)


@pytest.fixture(scope="module")
def reference(launcher: Launcher, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crash_ref") / "run"
    assert _train(launcher, images, out) == 0, (out.parent / "run.log").read_text()[-3000:]
    return out


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.endswith(".log")}


def assert_same_run(a: Path, b: Path) -> None:
    """Every file of two run folders equal: tensors bit-identical (and same dtypes), JSON equal except
    wall-clock seconds, everything else byte-identical."""
    assert _files(a) == _files(b)
    for rel in sorted(_files(a)):
        pa, pb = a / rel, b / rel
        if rel.endswith(".safetensors"):
            ta, tb = load_file(pa), load_file(pb)
            assert ta.keys() == tb.keys(), rel
            bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
            assert not bad, f"{rel}: {bad[:5]}"
        elif rel.endswith("state.json"):
            sa, sb = (json.loads(p.read_text()) for p in (pa, pb))
            sa["meta"].pop("seconds"), sb["meta"].pop("seconds")
            assert sa == sb, rel
        elif rel == "metrics.json":
            ma, mb = (json.loads(p.read_text()) for p in (pa, pb))
            ma.pop("train_seconds"), mb.pop("train_seconds")
            assert ma == mb
        elif rel == "config.yaml":  # differs in train.out only
            assert pa.read_text().replace(str(a), "OUT") == pb.read_text().replace(str(b), "OUT")
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel


def kill_plan(seed: int, kills: int) -> list[str]:
    """``kills`` seeded kill moments; the last one after the final export when ``kills`` >= 3."""
    rng = random.Random(seed)
    plan = [f"{m}:{rng.randint(2 if m == 'ckpt' else 1, MOMENTS[m])}"
            for m in (rng.choice(sorted(MOMENTS)) for _ in range(kills - (kills >= 3)))]
    return plan + (["export:1"] if kills >= 3 else [])


def crash_and_compare(launcher: Launcher, images: Path, reference: Path, out: Path, plan: list[str]) -> list[str]:
    """Run ``plan``'s kills in turn (each a rerun of the same command), then finish; returns the kills that
    landed, in order."""
    landed = []
    for kill in plan:
        rc = _train(launcher, images, out, kill)
        if rc == 0:  # the run ended before that moment came
            continue
        assert rc == -9, (out.parent / f"{out.name}.log").read_text()[-3000:]
        landed.append(kill)
    print("landed:", landed)
    if not (out / "metrics.json").is_file() or landed[-1:] == ["export:1"]:
        assert _train(launcher, images, out) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    assert_same_run(reference, out)
    return landed


def test_reference_run_is_complete(reference: Path) -> None:
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}" for s in (3, 6, 9, 12, 15, 16)]
    last = reference / "checkpoints" / "step-00000016"
    disc = load_file(last / "loss.safetensors")
    assert any(k.endswith("running_mean") for k in disc), "the discriminator's BatchNorm buffers are saved"
    assert {"optimizer-vae.safetensors", "optimizer-disc.safetensors", "ema.safetensors", "rng-0.json"} <= {
        p.name for p in last.iterdir()}
    # The global streams move between checkpoints (SDVAE_TEST_GLOBAL_RNG draws from each on every
    # micro-batch), so the resume tests below see whether each one is restored.
    first = reference / "checkpoints" / "step-00000003"
    py_a, np_a = (json.loads((first / "rng-0.json").read_text())[k] for k in ("python", "numpy"))
    py_b, np_b = (json.loads((last / "rng-0.json").read_text())[k] for k in ("python", "numpy"))
    assert py_a != py_b and np_a != np_b
    torch_a, torch_b = (load_file(c / "rng-0.safetensors")["torch"] for c in (first, last))
    assert not torch.equal(torch_a, torch_b)


def test_kills_at_chosen_moments_resume_bit_exact(launcher: Launcher, images: Path, reference: Path,
                                                  tmp_path: Path) -> None:
    """Fast variant: mid-accumulation, during a checkpoint write, after the final export."""
    plan = ["accum:7", "ckpt:9", "export:1"]
    assert crash_and_compare(launcher, images, reference, tmp_path / "run", plan) == plan


@pytest.mark.slow
def test_seeded_random_kills_resume_bit_exact(launcher: Launcher, images: Path, reference: Path,
                                              tmp_path: Path) -> None:
    """Slow variant: 11 seeded kills among all moments (mid-accumulation, before an optimizer step,
    between checkpoint files, in validation, after the export)."""
    plan = kill_plan(seed=17, kills=11)
    landed = crash_and_compare(launcher, images, reference, tmp_path / "run", plan)
    assert len(landed) >= 10, (plan, landed)
    assert {k.split(":")[0] for k in landed} == {*MOMENTS, "export"}, landed
