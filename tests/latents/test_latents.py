"""Latent scaling (the named functions) and the latents file format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdvae.errors import UserError
from sdvae.latents.file import read_latents_file, write_latents_file
from sdvae.latents.scaling import scale_latents, unscale_latents
from sdvae.model.family import is_flux2
from sdvae.model.presets import PRESETS


# FLUX.2's rule (patchify + BatchNorm statistics) has its own tests: tests/latents/test_scaling_flux2.py.
@pytest.mark.parametrize("name", [n for n in PRESETS if not is_flux2(PRESETS[n].config)])
def test_scale_unscale_inverse_and_formula(name: str) -> None:
    cfg = PRESETS[name].config
    z = torch.randn(2, cfg["latent_channels"], 5, 6)
    scaled = scale_latents(z, cfg)
    # diffusers pipelines: latents = (z - shift) * scaling_factor; decode(latents / scaling + shift)
    shift = cfg.get("shift_factor") or 0.0
    torch.testing.assert_close(scaled, (z - shift) * cfg["scaling_factor"])
    torch.testing.assert_close(unscale_latents(scaled, cfg), z)


def test_per_channel_mean_std_take_precedence() -> None:
    cfg = {"scaling_factor": 0.5, "shift_factor": 0.3, "latents_mean": [1.0, -1.0], "latents_std": [2.0, 4.0]}
    z = torch.randn(1, 2, 3, 3)
    scaled = scale_latents(z, cfg)
    torch.testing.assert_close(scaled[:, 0], (z[:, 0] - 1.0) * 0.5 / 2.0)
    torch.testing.assert_close(scaled[:, 1], (z[:, 1] + 1.0) * 0.5 / 4.0)
    torch.testing.assert_close(unscale_latents(scaled, cfg), z)


def test_latents_file_roundtrip(tmp_path: Path) -> None:
    tensors = {"00000.mean": torch.randn(4, 3, 5), "00000.logvar": torch.randn(4, 3, 5)}
    meta = {"format": "sdvae-latents/1", "config_hash": "abc", "scaled": False, "images": [{"size": [40, 24]}]}
    path = write_latents_file(tensors, meta, tmp_path / "sub" / "lat.safetensors")
    got, got_meta = read_latents_file(path)
    assert got_meta == meta
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert [p.name for p in path.parent.iterdir()] == ["lat.safetensors"]


def test_latents_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.safetensors"):
        read_latents_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match=r"junk\.safetensors"):
        read_latents_file(junk)
    with pytest.raises(UserError, match=r"\.safetensors"):
        write_latents_file({}, {}, tmp_path / "x.pt")


# --- latent datasets (sdvae encode-dataset outputs) -------------------------------------------------


@pytest.fixture(scope="module")
def latent_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from helpers import make_photo
    from sdvae.latents.export import EncodeOptions, run_encode

    root = tmp_path_factory.mktemp("latent_ds")
    for i in range(6):
        Image.fromarray(make_photo(40 + i, 36, seed=i)).save(root / f"{i}.png")
    out = root.parent / f"{root.name}-out"
    run_encode(EncodeOptions(src=str(root), out=str(out), model="test", resolution=32, shard_size=4, progress=False))
    return out


def test_latent_dataset_deterministic_samples(latent_dataset: Path) -> None:
    from sdvae.latents.dataset import LatentDataset

    a, b = LatentDataset(latent_dataset, seed=3), LatentDataset(latent_dataset, seed=3)
    item = a[2]
    assert item["latent"].shape == (4, 4, 4) and item["latent"].dtype == torch.float32
    assert item["key"] == "2.png" and item["index"] == 2 and item["original_size"].tolist() == [36, 42]
    assert torch.equal(item["latent"], b[2]["latent"])  # same (seed, epoch, index) → same draw
    assert not torch.equal(item["latent"], LatentDataset(latent_dataset, seed=4)[2]["latent"])
    b.set_epoch(1)
    assert not torch.equal(item["latent"], b[2]["latent"])  # a new draw each epoch
    # sample=False: the stored mean, whatever the seed
    assert torch.equal(LatentDataset(latent_dataset, sample=False, seed=1)[2]["latent"],
                       LatentDataset(latent_dataset, sample=False, seed=2)[2]["latent"])


def test_latent_dataset_scaling_goes_through_scale_latents(latent_dataset: Path) -> None:
    from sdvae.latents.dataset import LatentDataset
    from sdvae.latents.format import read_dataset_meta

    meta = read_dataset_meta(latent_dataset)
    raw = LatentDataset(latent_dataset, scaled=False, seed=1)
    scaled = LatentDataset(latent_dataset, seed=1)
    z = raw[4]["latent"]
    torch.testing.assert_close(scaled[4]["latent"], scale_latents(z[None], meta["scaling"])[0])
    custom = {"scaling_factor": 2.0, "shift_factor": 0.25}
    torch.testing.assert_close(LatentDataset(latent_dataset, seed=1, scaling=custom)[4]["latent"], (z - 0.25) * 2.0)
    mean, _ = LatentDataset(latent_dataset, scaled=False, sample=False).unscaled(4)
    assert not torch.equal(mean, z)  # the sample differs from the mean, by about one posterior std
    batch = next(iter(torch.utils.data.DataLoader(scaled, batch_size=4)))
    assert batch["latent"].shape == (4, 4, 4, 4) and batch["crop_box"].shape == (4, 4)


def test_latent_dataset_errors(tmp_path: Path) -> None:
    from sdvae.latents.dataset import LatentDataset
    from sdvae.latents.format import ENCODE_ARGS

    with pytest.raises(UserError, match="not an `sdvae encode-dataset` output"):
        LatentDataset(tmp_path)
    (tmp_path / ENCODE_ARGS).write_text("{}")
    with pytest.raises(UserError, match="run the same command again"):
        LatentDataset(tmp_path)


@pytest.mark.parametrize("channels", [4, 16, 3, 1])
def test_latent_preview_shape_and_range(channels: int) -> None:
    from sdvae.latents.preview import SD_LATENT_RGB, latent_preview, latent_rgb_matrix

    z = torch.randn(2, channels, 5, 7) * 3
    preview = latent_preview(z, upscale=8)
    assert preview.shape == (2, 3, 40, 56) and preview.min() >= 0 and preview.max() <= 1
    assert latent_preview(z[0]).shape == (1, 3, 5, 7)
    matrix = latent_rgb_matrix(channels)
    assert matrix.shape == (channels, 3)
    if channels == 4:
        assert torch.equal(matrix, torch.tensor(SD_LATENT_RGB))
    else:  # fallback: unit-variance channels give colours of std 0.5
        assert torch.allclose(matrix.pow(2).sum(0)[: min(channels, 3)], torch.tensor(0.25))
    # It is a fixed linear map: zero latents are mid-grey, and the map does not depend on the data.
    assert torch.allclose(latent_preview(torch.zeros(1, channels, 2, 2)), torch.tensor(0.5))
    torch.testing.assert_close(latent_preview(z)[:, :, :1, :1], latent_preview(z[:, :, :1, :1]))


def test_rgb_fit_recovers_a_known_linear_map() -> None:
    """Colours made as a known affine function of the latents, plus detail that averages out within each latent
    cell: the fit from sums over two batches gives back the map."""
    from sdvae.latents.preview import rgb_fit_sums, solve_rgb_map

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=generator) * 0.3, torch.tensor([0.1, -0.2, 0.05])
    totals = None
    for _ in range(2):
        z = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
        cells = torch.einsum("bchw,ck->bkhw", z, weight.double()) + bias.double()[None, :, None, None]
        pixels = cells.repeat_interleave(8, -2).repeat_interleave(8, -1)
        pixels[..., 0::2, :] += 0.3  # zero-mean detail within every 8x8 cell
        pixels[..., 1::2, :] -= 0.3
        sums = rgb_fit_sums(z.float(), pixels.float())
        totals = sums if totals is None else (totals[0] + sums[0], totals[1] + sums[1])
    assert totals[0].shape == (5, 5) and totals[1].shape == (5, 3) and totals[0].dtype == torch.float64
    fitted_weight, fitted_bias = solve_rgb_map(*totals)
    torch.testing.assert_close(fitted_weight, weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-5, rtol=0)


def test_preview_map_choice() -> None:
    """Fitted map first; SD's coefficients only for SD 1.x/2.x's latent space; else arbitrary."""
    from sdvae.latents.preview import SD_LATENT_RGB, is_sd_latent_space, latent_preview, preview_rgb_map
    from sdvae.model.build import build_preset
    from sdvae.model.info import config_dict

    sd = dict(PRESETS["sd"].config)
    assert is_sd_latent_space(sd) and is_sd_latent_space({**sd, "sample_size": 256, "force_upcast": False})
    # A loaded model's full config (every diffusers default filled in) with SD's architecture and scaling.
    full = {**config_dict(build_preset("test")), **sd}
    assert is_sd_latent_space(full)
    for other in ({**sd, "scaling_factor": 0.13025}, dict(PRESETS["sdxl"].config), dict(PRESETS["tiny"].config),
                  dict(PRESETS["test"].config), dict(PRESETS["sd3"].config), {**full, "use_quant_conv": False},
                  {**sd, "shift_factor": 0.1}, {**PRESETS["test"].config, "scaling_factor": 0.18215}):
        assert not is_sd_latent_space(other)

    z = torch.randn(1, 4, 3, 3)
    sd_map = preview_rgb_map(sd)
    assert sd_map.source == "sd"
    # On unscaled latents it equals SD's coefficients on the scaled ones.
    torch.testing.assert_close(latent_preview(z, rgb_map=sd_map), latent_preview(scale_latents(z, sd)))
    torch.testing.assert_close(sd_map.weight, torch.tensor(SD_LATENT_RGB) * 0.18215)
    test_map = preview_rgb_map(PRESETS["test"].config)
    assert test_map.source == "arbitrary" and test_map.weight.shape == (4, 3)
    fitted = preview_rgb_map(sd, {"weight": [[1, 0, 0]] * 4, "bias": [0.5, 0, 0]})
    assert fitted.source == "fitted"
    assert torch.allclose(latent_preview(torch.zeros(1, 4, 2, 2), rgb_map=fitted)[0, :, 0, 0],
                          torch.tensor([0.75, 0.5, 0.5]))
