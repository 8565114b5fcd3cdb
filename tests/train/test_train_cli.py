"""tools/train.py's command line without training: --help, --print-config, launcher-decided keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

TRAIN = str(REPO / "tools" / "train.py")
CONFIG = str(REPO / "configs" / "test.yaml")


def _train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    full |= {"HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=full, cwd=REPO,
                          timeout=300)


def test_help_exits_0_and_lists_every_key():
    from sdvae.train.config import config_keys

    for args in (["--help"], [CONFIG, "--train.steps=3", "-h"]):
        proc = _train(*args)
        assert proc.returncode == 0, proc.stderr
        for key, _type, _default, comment in config_keys():
            assert f"--{key} " in proc.stdout and comment in proc.stdout


def test_print_config_takes_mixed_precision_from_accelerate_unless_the_yaml_sets_it():
    proc = _train(CONFIG, "--print-config", "--train.steps=3", env={"ACCELERATE_MIXED_PRECISION": "bf16",
                                                                     "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["mixed_precision"] == "bf16" and cfg["train"]["grad_accum"] == 3
    assert cfg["train"]["num_processes"] == 1 and cfg["train"]["steps"] == 3
    proc = _train(CONFIG, "--print-config", "--train.mixed_precision=no", "--train.grad_accum=1",
                  env={"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3"})
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["mixed_precision"] == "no" and cfg["train"]["grad_accum"] == 1


@pytest.mark.slow
def test_num_processes_mismatch_is_refused():
    proc = _train(CONFIG, "--print-config", "--train.num_processes=2")
    assert proc.returncode == 2 and "train.num_processes=2 but the launcher started 1" in proc.stderr
