"""Disk errors while training writes a checkpoint: no partial step folder, the previous checkpoint loads, a
retry succeeds (sdvae.train.checkpoint; simulated ENOSPC/EROFS in safetensors' writer and the final rename)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import sdvae.train.checkpoint as ckpt
from sdvae.errors import WriteError


def _state(seed: int):
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return module, opt, sched


def _save(out: Path, step: int, module, opt, sched) -> Path:
    return ckpt.save_checkpoint(out, step, modules={"vae": module}, optimizers={"vae": opt},
                                schedulers={"vae": sched}, extra_tensors={"ema": {"w": torch.ones(2)}},
                                meta={"skipped": 0}, keep=2)


@pytest.mark.parametrize("where", ["weights", "rename"])
def test_failed_checkpoint_leaves_the_previous_one_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            where: str) -> None:
    module, opt, sched = _state(0)
    first = _save(tmp_path, 10, module, opt, sched)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)
    with monkeypatch.context() as m:
        if where == "weights":  # the disk fills while the optimizer state is written
            real = ckpt.save_file

            def save_file(tensors, path, *args, **kwargs):
                if Path(path).name.startswith("optimizer-"):
                    Path(path).write_bytes(b"partial")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(tensors, path, *args, **kwargs)

            m.setattr(ckpt, "save_file", save_file)
        else:  # the checkpoints folder turned read-only before the final rename
            def replace(src, dst):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            m.setattr(ckpt.os, "replace", replace)
        with pytest.raises(WriteError) as err:
            _save(tmp_path, 20, module, opt, sched)
    message = str(err.value)
    assert "\n" not in message and "step-00000020: cannot write (" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010"]
    assert ckpt.latest_checkpoint(tmp_path) == first
    fresh, fresh_opt, fresh_sched = _state(1)
    step, extra, meta = ckpt.load_checkpoint(first, modules={"vae": fresh}, optimizers={"vae": fresh_opt},
                                             schedulers={"vae": fresh_sched})
    assert step == 10 and meta == {"skipped": 0} and torch.equal(extra["ema"]["w"], torch.ones(2))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    # The fault removed, the same checkpoint is written (training continues from where it was).
    assert ckpt.latest_checkpoint(tmp_path) == first
    second = _save(tmp_path, 20, module, opt, sched)
    assert ckpt.latest_checkpoint(tmp_path) == second
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]


def test_rewriting_the_same_step_keeps_the_old_folder_if_the_rename_fails(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    module, opt, sched = _state(0)
    first = _save(tmp_path, 10, module, opt, sched)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name == "step-00000010.tmp":  # the new folder cannot take the old one's place
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with torch.no_grad():
        module.weight.add_(1.0)
    with pytest.raises(WriteError, match="step-00000010: cannot write"):
        _save(tmp_path, 10, module, opt, sched)
    assert ("step-00000010", "step-00000010.old") in calls  # the old folder was moved aside, then back
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
