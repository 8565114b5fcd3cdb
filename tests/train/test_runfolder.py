"""sdvae.train.runfolder (train.resume) and checkpoint retention (keep_checkpoints: 0 keeps all)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sdvae.errors import UserError
from sdvae.train.checkpoint import save_checkpoint
from sdvae.train.config import config_to_dict, load_config
from sdvae.train.runfolder import changed_keys, move_checkpoints_aside, resume_point


def _run_folder(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    out = tmp_path / "run"
    cfg = config_to_dict(load_config(None, [f"--train.out={out}", *overrides]))
    (out / "checkpoints" / "step-00000010").mkdir(parents=True)
    (out / "checkpoints" / "step-00000010" / "state.json").write_text("{}")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out, cfg


def test_rerun_with_a_trajectory_changing_key_is_refused_naming_the_keys(tmp_path: Path):
    out, _ = _run_folder(tmp_path, "--train.steps=100")
    new = config_to_dict(load_config(None, [f"--train.out={out}", "--train.steps=200", "--optim.lr=1e-4"]))
    with pytest.raises(UserError) as err:
        resume_point(out, new, "auto")
    message = str(err.value)
    assert "optim.lr, train.steps" in message and "--train.resume=never" in message and "\n" not in message


def test_rerun_with_only_free_keys_resumes(tmp_path: Path):
    out, _ = _run_folder(tmp_path, "--train.steps=100")
    new = config_to_dict(load_config(None, [f"--train.out={out}", "--train.steps=100", "--train.val_every=7",
                                            "--log.with=none", "--data.num_workers=0"]))
    assert resume_point(out, new, "auto") == (out / "checkpoints" / "step-00000010", False)
    assert changed_keys({"train": {"steps": 1, "seed": 1}}, {"train": {"steps": 1, "seed": 2}}) == ["train.seed"]
    assert changed_keys({"train": {"steps": 1}}, {"train": {"steps": 1, "compile": True}}) == []  # older run


def test_resume_never_moves_old_checkpoints_aside_and_path_resumes_from_there(tmp_path: Path):
    out, cfg = _run_folder(tmp_path)
    assert resume_point(out, cfg | {"train": {**cfg["train"], "steps": 5}}, "never") == (None, True)
    moved = move_checkpoints_aside(out)
    assert moved.name == "checkpoints-replaced-1" and (moved / "step-00000010" / "state.json").is_file()
    assert not (out / "checkpoints").exists()
    assert resume_point(tmp_path / "elsewhere", cfg, str(out / "checkpoints-replaced-1" / "step-00000010")) == (
        moved / "step-00000010", False)
    with pytest.raises(UserError, match="no checkpoint there"):
        resume_point(out, cfg, str(tmp_path / "nothing"))


@pytest.mark.parametrize("keep, left", [(0, 4), (2, 2)])
def test_keep_checkpoints_zero_keeps_all(tmp_path: Path, keep: int, left: int):
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, modules={"m": module}, optimizers={"m": opt}, schedulers={},
                        extra_tensors={}, meta={}, keep=keep)
    assert len(list((tmp_path / "checkpoints").iterdir())) == left
