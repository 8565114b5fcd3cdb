"""FLUX.2's VAE (AutoencoderKLFlux2): the preset, loading, info, and diffusers folder ⇄ original single file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux2_helpers import small_flux2, small_flux2_folder
from sdvae.errors import UserError
from sdvae.model.build import build_preset
from sdvae.model.convert import convert
from sdvae.model.info import describe, scaled_factor
from sdvae.model.load import load_vae
from sdvae.model.save import write_ldm


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_folder_to_original_file_and_back_bit_exact(tmp_path: Path) -> None:
    """diffusers folder → FLUX.2's own file layout → diffusers folder: every tensor, BatchNorm buffers included."""
    folder = small_flux2_folder(tmp_path / "vae")
    single = convert(folder, tmp_path / "ae.safetensors", to="ldm")
    ldm = load_file(single)
    # The release's layout (black-forest-labs/flux2 src/flux2/autoencoder.py): quant convs inside
    # encoder/decoder, the BatchNorm at the top, no prefix.
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_mean", "bn.running_var",
            "bn.num_batches_tracked"} <= ldm.keys()
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.", "first_stage_model.")) for k in ldm)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    assert ldm["bn.num_batches_tracked"].dtype == torch.int64 and int(ldm["bn.num_batches_tracked"]) == 11
    back = convert(single, tmp_path / "back")
    _same_tensors(load_file(folder / "diffusion_pytorch_model.safetensors"),
                  load_file(back / "diffusion_pytorch_model.safetensors"))
    # ... and the other way: the single file written again from the folder is the same file content.
    again = convert(back, tmp_path / "again.safetensors", to="ldm")
    _same_tensors(ldm, load_file(again))
    vae = load_vae(single)
    assert isinstance(vae, AutoencoderKLFlux2) and vae.config.batch_norm_eps == 1e-4
    assert torch.equal(vae.bn.running_var, small_flux2().bn.running_var)
    pipeline = tmp_path / "pipeline"  # a pipeline folder (as FLUX.2-dev's) holds the VAE in vae/
    pipeline.mkdir()
    folder.rename(pipeline / "vae")
    from_pipeline = load_vae(pipeline)
    assert isinstance(from_pipeline, AutoencoderKLFlux2)
    assert torch.equal(from_pipeline.bn.running_mean, vae.bn.running_mean)


def test_file_without_our_metadata_reads_as_flux2(tmp_path: Path) -> None:
    """A release-style file (no sdvae metadata) is recognised from its keys and loads exactly."""
    vae = small_flux2()
    write_ldm(vae, tmp_path / "ours.safetensors")
    plain = tmp_path / "ae.safetensors"
    save_file(load_file(tmp_path / "ours.safetensors"), plain)  # same tensors, no metadata
    got = load_vae(plain)
    assert isinstance(got, AutoencoderKLFlux2)
    want = vae.state_dict()
    got_sd = got.state_dict()
    assert got_sd.keys() == want.keys() and all(torch.equal(got_sd[k], want[k]) for k in want)


def test_full_size_preset_convert_and_diffusers_load(tmp_path: Path) -> None:
    """The full `flux2` preset: 32 latent channels, BatchNorm over 128; both formats hold the same tensors."""
    vae = build_preset("flux2")
    assert isinstance(vae, AutoencoderKLFlux2) and vae.bn.num_features == 128
    assert vae.config.latent_channels == 32 and list(vae.config.block_out_channels) == [128, 256, 512, 512]
    single = convert("flux2", tmp_path / "flux2.safetensors", to="ldm", dtype="bf16")
    folder = convert(single, tmp_path / "flux2")
    theirs = AutoencoderKLFlux2.from_pretrained(folder)  # diffusers' own loader takes our folder
    with safe_open(single, "pt") as f:
        assert len(list(f.keys())) == len(theirs.state_dict())
        assert torch.equal(f.get_tensor("encoder.quant_conv.weight"), theirs.quant_conv.weight)
    for key, tensor in vae.state_dict().items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(theirs.state_dict()[key], expected), key
    facts = describe(vae)
    assert facts["family"].startswith("FLUX.2") and "bn.running_mean" in facts["latent_normalization"]
    assert facts["scaled_latent_shape"] == [128, "H/16", "W/16"] and scaled_factor(vae) == 16


def test_missing_batchnorm_statistics_one_line_nothing_written(tmp_path: Path) -> None:
    write_ldm(small_flux2(), tmp_path / "ae.safetensors")
    tensors = load_file(tmp_path / "ae.safetensors")
    del tensors["bn.running_var"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        convert(broken, out)
    assert "\n" not in str(err.value) and str(broken) in str(err.value) and "bn.running_var" in str(err.value)
    assert not out.exists()


def test_four_channel_file_claiming_flux2_one_line(tmp_path: Path) -> None:
    """A 4-latent-channel VAE with a FLUX.2 BatchNorm of 128 (not 4×4) is refused; so is flux2 scaling on an SD file."""
    sd = build_preset("test")
    write_ldm(sd, tmp_path / "sd.safetensors")
    tensors = load_file(tmp_path / "sd.safetensors")
    claimed = {**tensors, "bn.running_mean": torch.zeros(128), "bn.running_var": torch.ones(128)}
    save_file(claimed, tmp_path / "claims.safetensors")
    with pytest.raises(UserError, match=r"claims\.safetensors: bn\.running_mean has shape \[128\].*4 latent") as err:
        convert(tmp_path / "claims.safetensors", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"needs a FLUX\.2 VAE") as err:
        load_vae(tmp_path / "sd.safetensors", preset_scaling="flux2")
    assert "\n" not in str(err.value)
