"""Run config (YAML → dataclasses → dotted overrides), LR schedule and EMA: the pieces train.py relies on."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import REPO
from sdvae.errors import UserError
from sdvae.train.config import OptimConfig, RunConfig, dump_config, load_config
from sdvae.train.ema import EMA
from sdvae.train.optim import build_optimizer, lr_factor

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))  # the recipes and configs/tiny-f8c4/stage-NN-*.yaml


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg


def test_stage_configs_are_numbered_and_config_comments_name_existing_paths():
    stages = sorted((REPO / "configs" / "tiny-f8c4").glob("*.yaml"))
    assert [p.name[:9] for p in stages] == [f"stage-{n:02d}-" for n in range(1, len(stages) + 1)]
    for path in CONFIGS:
        comments = " ".join(line.partition("#")[2] for line in path.read_text().splitlines())
        # repository paths, not COMMIT:PATH (`git archive`) or another repository's OWNER/NAME/PATH
        for named in re.findall(r"(?<![\w./:-])(?:configs|sdvae|tools|docs|checkpoints)/[\w./-]*\w", comments):
            assert (REPO / named).exists(), f"{path.relative_to(REPO)} names {named}, which does not exist"


def test_overrides_are_typed_and_nested(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  kl_weight: 1e-6\noptim:\n  betas: [0.5, 0.9]\n")
    cfg = load_config(path, ["--loss.kl_weight=1e-4", "--train.steps", "7", "--optim.betas=[0.9, 0.99]",
                             "--model.train_encoder=false", "--data.mosaic_grids=[1, 2, 4, 4]"])
    assert cfg.loss.kl_weight == pytest.approx(1e-4) and isinstance(cfg.loss.kl_weight, float)
    assert cfg.train.steps == 7
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.train_encoder is False
    assert cfg.data.mosaic_grids == (1, 2, 4, 4)  # any-length list
    assert cfg.loss.recon == "l1"  # untouched defaults stay


@pytest.mark.parametrize("overrides, message", [
    (["--loss.kl_wieght=1"], "loss: unknown key(s) kl_wieght"),
    (["--trian.steps=1"], "unknown section(s) trian"),
    (["--train.steps=ten"], "train.steps: expected int"),
    (["--loss.recon=l3"], "loss.recon: 'l3' is not one of"),
    (["--optim.betas=[0.9]"], "optim.betas: expected a list of 2"),
    (["--data.mosaic_grids=4"], "data.mosaic_grids: expected a list"),
    (["--data.mosaic_grids=[1, x]"], "data.mosaic_grids[1]: expected int"),
    (["steps=3"], "overrides look like --section.key=value"),
    (["--steps=3"], "overrides look like --section.key=value"),
    (["--train.val_every=0"], "train.val_every: must be >= 1, got 0"),
    (["--train.checkpoint_every=-5"], "train.checkpoint_every: must be >= 1"),
    (["--train.batch_size=0"], "train.batch_size: must be >= 1"),
    (["--log.every=0"], "log.every: must be >= 1"),
])
def test_bad_keys_and_values_name_the_key(overrides: list[str], message: str):
    with pytest.raises(UserError, match=None) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup reaches 1
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55)  # half-way through the cosine: midpoint of 1 and the floor
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # monotone decay after warmup
    const = OptimConfig(schedule="constant")
    assert {lr_factor(s, const, 50) for s in range(50)} == {1.0}


def test_optimizer_schedule_drives_the_learning_rate():
    w = nn.Parameter(torch.zeros(3))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine")
    opt, sched = build_optimizer([w, frozen], cfg.lr, cfg, 20)
    assert [p for g in opt.param_groups for p in g["params"]] == [w]  # frozen parameters are left out
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3 * (s + 1) / 4 for s in range(4)] + [1e-3])


def test_ema_averages_warms_up_and_round_trips():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.99, 2 / 11)  # warm-up: the first update moves most of the way
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, d * start[k] + (1 - d) * (start[k] + 1))
    other = nn.Linear(2, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, ema.shadow["weight"])
    restored = EMA(nn.Linear(2, 2), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)


def test_no_yes_on_off_are_strings_for_string_keys_and_booleans_for_bool_keys(tmp_path: Path):
    cfg = load_config(None, ["--train.mixed_precision=no", "--data.flip=off", "--model.train_encoder=no",
                             "--loss.disc_adaptive_weight=yes"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.flip is False and cfg.model.train_encoder is False and cfg.loss.disc_adaptive_weight is True
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  flip: on\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.data.flip is True
    assert load_config(None, ["--train.mixed_precision=null"]).train.mixed_precision is None
    with pytest.raises(UserError, match=r"train\.mixed_precision: .maybe. is not one of"):
        load_config(None, ["--train.mixed_precision=maybe"])


def test_launcher_keys_default_to_unset_and_log_with_round_trips(tmp_path: Path):
    cfg = RunConfig()
    assert cfg.train.mixed_precision is None and cfg.train.grad_accum is None and cfg.train.num_processes is None
    cfg = load_config(None, ["--log.with=none", "--train.grad_accum=3"])
    assert cfg.log.with_ == "none" and cfg.train.grad_accum == 3
    text = dump_config(cfg)
    assert "with: none" in text and "with_" not in text
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    assert load_config(saved) == cfg


def test_help_lists_every_key_with_type_default_and_comment():
    from sdvae.train.config import config_help, config_keys

    rows = config_keys()
    assert {r[0] for r in rows} >= {"train.mixed_precision", "log.with", "optim.scale_lr", "train.resume"}
    assert all(comment for *_, comment in rows), [r[0] for r in rows if not r[3]]
    text = config_help()
    for key, type_name, _default, comment in rows:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{key} "))
        assert type_name in line and comment in line
    assert "--train.mixed_precision" in text and "no|bf16|fp16 or null (default null)" in text


def test_scale_lr_is_ldms_batch_times_processes_times_accumulation():
    from sdvae.train.optim import effective_lr

    assert effective_lr(4.5e-6, OptimConfig(scale_lr=True), 12, 8, 2) == pytest.approx(4.5e-6 * 12 * 8 * 2)
    assert effective_lr(4.5e-6, OptimConfig(scale_lr=False), 12, 8, 2) == 4.5e-6
    assert load_config(REPO / "configs" / "sd-kl-f8.yaml").optim.scale_lr
