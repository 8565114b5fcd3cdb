"""Presets, load_vae (every way in except single files: see test_convert.py), save_diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdvae.errors import UserError
from sdvae.model.build import build_preset, deepen, regroup_norms
from sdvae.model.family import vae_classes
from sdvae.model.info import config_hash, describe, downsample_factor
from sdvae.model.load import load_vae
from sdvae.model.presets import PRESETS
from sdvae.model.save import save_diffusers


def _outputs(vae: AutoencoderKL, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder moments and decoder output on a fixed random input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 32, 40, generator=g) * 2 - 1
    with torch.no_grad():
        moments = vae.encode(x).latent_dist
        return torch.cat([moments.mean, moments.logvar], 1), vae.decode(moments.mean).sample


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_config_and_seeded_init(name: str) -> None:
    """Each preset builds the diffusers model it declares, deterministically from its seed."""
    cfg = PRESETS[name].config
    a = build_preset(name, seed=1)
    assert isinstance(a, vae_classes()) and type(a).__name__ == ("AutoencoderKLFlux2" if name == "flux2" else
                                                                 "AutoencoderKL")
    for key, value in cfg.items():
        got = a.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    w = "decoder.conv_out.weight"
    if name in ("tiny", "test"):  # the big presets take seconds to build: compare one seed pair only
        assert torch.equal(a.state_dict()[w], build_preset(name, seed=1).state_dict()[w])
        assert not torch.equal(a.state_dict()[w], build_preset(name, seed=2).state_dict()[w])
    facts = describe(a)
    assert facts["latent_channels"] == cfg["latent_channels"]
    assert facts["image_channels"] == [cfg.get("in_channels", 3), cfg.get("out_channels", 3)]
    assert facts["downsampling_factor"] == 2 ** (len(cfg["block_out_channels"]) - 1) == downsample_factor(a)
    assert facts["parameters"]["total"] == sum(p.numel() for p in a.parameters())
    assert facts["parameters"]["encoder"] + facts["parameters"]["decoder"] == facts["parameters"]["total"]


def test_regroup_norms_keeps_weights_and_changes_only_the_grouping(test_vae: AutoencoderKL) -> None:
    """Same tensors, new group count everywhere, a different function; the source model is untouched."""
    before = {k: v.clone() for k, v in test_vae.state_dict().items()}
    out = regroup_norms(test_vae, 2)
    assert out.config.norm_num_groups == 2 and test_vae.config.norm_num_groups == 4
    norms = [m for m in out.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    assert out.state_dict().keys() == before.keys()
    assert all(torch.equal(out.state_dict()[k], v) for k, v in before.items())
    # Equal to a plain diffusers model of that config carrying the weights (an independent oracle).
    oracle = AutoencoderKL(**{**test_vae.config, "norm_num_groups": 2}).eval()
    oracle.load_state_dict(before)
    ours, theirs = _outputs(out.eval()), _outputs(oracle)
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.allclose(ours[1], _outputs(test_vae)[1])  # grouping changes what the net computes
    with torch.no_grad():
        next(out.parameters()).add_(1.0)
    assert all(torch.equal(test_vae.state_dict()[k], v) for k, v in before.items())  # no shared storage
    with pytest.raises(UserError, match=r"norm_num_groups=3 must be positive and divide every block width"):
        regroup_norms(test_vae, 3)


def test_deepen_adds_identity_layers_that_train(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    """More ResNet layers per block, the same function bit for bit, new layers that learn; source untouched."""
    before = {k: v.clone() for k, v in test_vae.state_dict().items()}
    out = deepen(test_vae, 3)
    assert out.config.layers_per_block == 3 and test_vae.config.layers_per_block == 1
    assert [len(b.resnets) for b in out.encoder.down_blocks] == [3] * 4
    assert [len(b.resnets) for b in out.decoder.up_blocks] == [4] * 4  # diffusers' decoder: one more
    assert all(torch.equal(out.state_dict()[k], v) for k, v in before.items())
    assert sum(p.numel() for p in out.parameters()) > sum(p.numel() for p in test_vae.parameters())
    ours, theirs = _outputs(out.eval()), _outputs(test_vae)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))  # exactly, not closely
    # The new layers are not dead: one step on a reconstruction loss moves their zero convolutions
    # and changes the output, while the source model keeps its weights.
    new = [m for name, m in out.named_modules() if name.endswith(("resnets.2", "resnets.3"))]
    assert new and all(not m.conv2.weight.any() for m in new)
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out.train()
    torch.nn.functional.mse_loss(out(x).sample, x).backward()
    opt.step()
    assert all(m.conv2.weight.any() for m in new)
    assert not torch.equal(_outputs(out.eval())[1], theirs[1])
    assert all(torch.equal(test_vae.state_dict()[k], v) for k, v in before.items())
    # Through load_vae (as training's model.layers_per_block), and diffusers loads what we save.
    save_diffusers(test_vae, tmp_path / "src")
    grown = load_vae(tmp_path / "src", layers_per_block=2)
    assert grown.config.layers_per_block == 2 and not grown.training
    assert all(torch.equal(a, b) for a, b in zip(_outputs(grown), theirs, strict=True))
    save_diffusers(grown, tmp_path / "grown")
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "grown").eval()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(reloaded), theirs, strict=True))
    # Equal depth keeps the model; fewer layers is refused in one line.
    assert all(torch.equal(a, b) for a, b in zip(_outputs(deepen(test_vae, 1).eval()), theirs, strict=True))
    with pytest.raises(UserError, match=r"layers_per_block=1 is less than the model's 2"):
        deepen(grown, 1)


def test_sd_family_scaling_constants() -> None:
    """The published constants (they decide whether latents match pretrained diffusion models)."""
    assert PRESETS["sd"].config["scaling_factor"] == 0.18215
    assert PRESETS["sdxl"].config["scaling_factor"] == 0.13025
    assert (PRESETS["sd3"].config["scaling_factor"], PRESETS["sd3"].config["shift_factor"]) == (1.5305, 0.0609)
    assert (PRESETS["flux"].config["scaling_factor"], PRESETS["flux"].config["shift_factor"]) == (0.3611, 0.1159)
    for name in ("sd3", "flux"):
        assert build_preset(name).quant_conv is None


def test_preset_parity_with_diffusers(test_vae: AutoencoderKL) -> None:
    """A preset equals a plain AutoencoderKL(**config) carrying the same weights."""
    ref = AutoencoderKL(**PRESETS["test"].config).eval()
    ref.load_state_dict(test_vae.state_dict())
    loaded = load_vae("test")
    for a, b in zip(_outputs(loaded), _outputs(ref), strict=True):
        assert torch.equal(a, b)


def test_diffusers_folder_roundtrip_and_parity(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    """save_diffusers -> load_vae and -> AutoencoderKL.from_pretrained give identical outputs."""
    folder = save_diffusers(test_vae, tmp_path / "vae_folder")
    ours, theirs = load_vae(folder), AutoencoderKL.from_pretrained(folder)
    for a, b, c in zip(_outputs(ours), _outputs(theirs), _outputs(test_vae), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert config_hash(ours) == config_hash(test_vae)


def test_pipeline_folder_with_vae_subfolder(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    pipe = tmp_path / "pipeline"
    save_diffusers(test_vae, pipe / "vae")
    (pipe / "model_index.json").write_text("{}")
    assert torch.equal(_outputs(load_vae(pipe))[1], _outputs(test_vae)[1])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_save_dtype(test_vae: AutoencoderKL, tmp_path: Path, dtype: str) -> None:
    folder = save_diffusers(test_vae, tmp_path / dtype, dtype=dtype)
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {{"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]}
    assert torch.equal(load_vae(folder).state_dict()["encoder.conv_in.weight"],
                       test_vae.state_dict()["encoder.conv_in.weight"].to(stored["encoder.conv_in.weight"].dtype).float())
    assert next(test_vae.parameters()).dtype == torch.float32  # the source model is left as it was


def test_save_refuses_to_clobber_and_replaces_atomically(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    out = tmp_path / "out"
    save_diffusers(test_vae, out)
    with pytest.raises(UserError, match="already exists"):
        save_diffusers(build_preset("test", seed=3), out)
    save_diffusers(build_preset("test", seed=3), out, overwrite=True)
    reloaded = load_vae(out)
    assert torch.equal(reloaded.state_dict()["decoder.conv_out.weight"],
                       build_preset("test", seed=3).state_dict()["decoder.conv_out.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_unknown_references_fail_with_one_line(tmp_path: Path) -> None:
    for ref in ["not-a-preset", str(tmp_path / "missing.safetensors"), "./nope", str(tmp_path)]:
        with pytest.raises(UserError) as err:
            load_vae(ref)
        assert "\n" not in str(err.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="bad"):
        load_vae(bad)


def test_hub_id_offline_error_names_the_id() -> None:
    with pytest.raises(UserError, match="someone/some-vae") as err:
        load_vae("someone/some-vae")
    assert "local" in str(err.value) and "\n" not in str(err.value)


def test_hub_id_loads_from_local_cache(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    """A hub id goes through diffusers' own hub loading (here served from a prepared offline cache)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-vae" / "snapshots" / ("0" * 40)
    save_diffusers(test_vae, snapshot / "vae")
    (tmp_path / "hub" / "models--someone--tiny-vae" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-vae" / "refs" / "main").write_text("0" * 40)
    code = ("import json,sys; from sdvae.model.load import load_vae; from sdvae.model.info import describe; "
            "print(json.dumps(describe(load_vae('someone/tiny-vae'))))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["config_hash"] == config_hash(test_vae)
