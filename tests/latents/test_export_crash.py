"""encode-dataset killed (SIGKILL of the process group, DataLoader workers included) at seeded random
moments, rerun each time: the finished dataset equals an uninterrupted run's row for row, and its shard
files and metadata byte for byte. Kills from tests/crash_hook.py (``SDVAE_TEST_KILL``)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from crash_hook import Launcher
from helpers import REPO, dataset_rows, save_photo
from sdvae.latents.format import read_dataset_meta

# after an encoded batch, before a shard's JSON side file, before a shard's rows file
MOMENTS = {"batch": 2, "json": 2, "shard": 2}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("encode_crash_images")
    for i in range(29):
        save_photo(root / f"im{i:02d}.png", 36 + 3 * (i % 5), 34 + 2 * (i % 4), seed=i)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a skip report in one shard
    return root


@pytest.fixture(scope="module")
def launcher():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDVAE_TEST_")}
    with Launcher(env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, REPO) as server:
        yield server


def _encode(launcher: Launcher, images: Path, out: Path, kill: str = "") -> int:
    args = ["-m", "sdvae.cli", "encode-dataset", images, out, "--model", "test", "--resolution", "32",
            "--crop", "random", "--store", "sample", "--shard-size", "2", "--batch-size", "2", "--dtype", "fp32",
            "--num-workers", "2", "--no-progress"]
    return launcher.run(args, out.parent / f"{out.name}.log", {"SDVAE_TEST_KILL": kill} if kill else {})


@pytest.fixture(scope="module")
def reference(launcher: Launcher, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("encode_ref") / "out"
    assert _encode(launcher, images, out) == 0, (out.parent / "out.log").read_text()[-3000:]
    return out


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def crash_and_compare(launcher: Launcher, images: Path, reference: Path, out: Path, plan: list[str]) -> list[str]:
    landed = []
    for kill in plan:
        rc = _encode(launcher, images, out, kill)
        assert rc in (0, -9), (out.parent / "out.log").read_text()[-3000:]
        if rc == -9:
            landed.append(kill)
    print("landed:", landed)
    assert _encode(launcher, images, out) == 0, (out.parent / "out.log").read_text()[-3000:]
    assert dataset_rows(out) == dataset_rows(reference)
    assert read_dataset_meta(out) == read_dataset_meta(reference)
    assert _shard_files(out) == _shard_files(reference)
    return landed


def test_two_kills_then_rerun_equals_uninterrupted(launcher: Launcher, images: Path, reference: Path,
                                                    tmp_path: Path) -> None:
    plan = ["json:2", "shard:2"]
    assert crash_and_compare(launcher, images, reference, tmp_path / "out", plan) == plan


@pytest.mark.slow
def test_seeded_random_kills_then_rerun_equals_uninterrupted(launcher: Launcher, images: Path, reference: Path,
                                                             tmp_path: Path) -> None:
    rng = random.Random(17)
    plan = [f"{m}:{rng.randint(1, MOMENTS[m])}" for m in (rng.choice(sorted(MOMENTS)) for _ in range(8))]
    landed = crash_and_compare(launcher, images, reference, tmp_path / "out", plan)
    assert len(landed) >= 6 and {k.split(":")[0] for k in landed} == set(MOMENTS), (plan, landed)
