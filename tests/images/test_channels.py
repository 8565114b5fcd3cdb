"""Images read and written to a model's channel count: 1 grayscale, 3 RGB, 4 RGBA (sdvae.images.channels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_photo
from sdvae.errors import UserError
from sdvae.images.channels import describe_channels, image_mode, model_channels, rgb_view
from sdvae.images.compose import CHECKER, for_display, image_grid, labelled_rows, side_by_side
from sdvae.images.load import image_to_tensor, load_image
from sdvae.images.sources import open_source
from sdvae.images.write import save_image, to_pil
from sdvae.latents.preview import rgb_fit_sums


def _rgba_photo(width: int = 20, height: int = 12) -> np.ndarray:
    """An RGBA array: a photo with a fully transparent left third and a half transparent middle third."""
    rgba = np.concatenate([make_photo(width, height), np.full((height, width, 1), 255, np.uint8)], axis=2)
    rgba[:, : width // 3, 3] = 0
    rgba[:, width // 3: 2 * width // 3, 3] = 128
    return rgba


def _model_space(pixels: np.ndarray) -> torch.Tensor:
    """(H,W) or (H,W,C) uint8 → (1,C,H,W) float in [-1, 1], load_image's scale."""
    arr = torch.from_numpy(pixels.astype(np.float32))
    arr = arr[..., None] if arr.dim() == 2 else arr
    return (arr / 127.5 - 1).permute(2, 0, 1)[None]


# --- the rule --------------------------------------------------------------------------------------


def test_channel_counts_map_to_modes_and_others_are_one_line_naming_the_count() -> None:
    assert [image_mode(c) for c in (1, 3, 4)] == ["L", "RGB", "RGBA"]
    for bad in (0, 2, 5):
        with pytest.raises(UserError, match=rf"model has {bad} image channels") as err:
            image_mode(bad)
        assert "\n" not in str(err.value) and "1 (grayscale), 3 (RGB) or 4 (RGBA)" in str(err.value)
    assert model_channels({"in_channels": 4, "out_channels": 4}) == 4
    assert model_channels({}) == 3  # diffusers' defaults
    with pytest.raises(UserError, match="reads 3 and writes 4 image channels"):
        model_channels({"in_channels": 3, "out_channels": 4})
    with pytest.raises(UserError, match="2 image channels"):
        load_image("never-read.png", channels=2)  # refused before the file is looked at
    assert "luminance" in describe_channels(1) and "alpha kept" in describe_channels(4)


def test_rgb_view() -> None:
    x = torch.rand(2, 1, 5, 6)
    assert torch.equal(rgb_view(x), x.expand(2, 3, 5, 6))
    rgb = torch.rand(2, 3, 5, 6)
    assert rgb_view(rgb) is rgb
    rgba = torch.rand(4, 5, 6)
    assert torch.equal(rgb_view(rgba), rgba[:3])
    with pytest.raises(ValueError, match="1, 3 or 4"):
        rgb_view(torch.rand(1, 2, 5, 6))


# --- reading ---------------------------------------------------------------------------------------


def test_grayscale_model_reads_colour_by_luminance_and_grey_as_is(tmp_path: Path) -> None:
    photo = make_photo(21, 13)
    Image.fromarray(photo).save(tmp_path / "rgb.png")
    loaded = load_image(tmp_path / "rgb.png", channels=1)
    expected = np.asarray(Image.fromarray(photo).convert("L"))  # Pillow's ITU-R 601-2 conversion
    assert loaded.tensor.shape == (1, 1, 13, 21) and loaded.size == (21, 13)
    assert torch.equal(loaded.tensor, _model_space(expected))
    assert loaded.notes == ["RGB converted to grayscale (luminance)"]

    Image.fromarray(expected).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png", channels=1)
    assert torch.equal(grey.tensor, loaded.tensor) and grey.notes == []


def test_grayscale_model_keeps_16_bit_precision(tmp_path: Path) -> None:
    values = ((np.arange(12 * 10).reshape(12, 10) * 523) % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png", channels=1)
    expected = torch.from_numpy(values.astype(np.float32) / 65535.0)[None, None] * 2 - 1
    torch.testing.assert_close(loaded.tensor, expected, atol=1e-6, rtol=0)
    assert any("16-bit" in n and "full precision" in n for n in loaded.notes)
    assert not any("RGB" in n for n in loaded.notes)
    rgb = load_image(tmp_path / "deep.png")  # the 3-channel reading is unchanged
    torch.testing.assert_close(rgb.tensor, expected.expand(1, 3, 12, 10), atol=1e-6, rtol=0)


def test_grayscale_model_composites_alpha_on_white(tmp_path: Path) -> None:
    rgba = _rgba_photo()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png", channels=1)
    rgb3 = load_image(tmp_path / "rgba.png").tensor  # RGB composited on white, in float
    luma = (rgb3 + 1) / 2 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.tensor, luma.sum(1, keepdim=True) * 2 - 1, atol=1e-5, rtol=0)
    assert torch.equal(loaded.tensor[..., :6], torch.ones(1, 1, 12, 6))  # transparent → white
    assert "alpha composited on white" in loaded.notes


def test_rgba_model_keeps_alpha_and_adds_an_opaque_one(tmp_path: Path) -> None:
    rgba = _rgba_photo()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png", channels=4)
    assert torch.equal(loaded.tensor, _model_space(rgba))  # straight alpha, colours untouched
    assert loaded.notes == []

    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    opaque = load_image(tmp_path / "rgb.png", channels=4)
    assert torch.equal(opaque.tensor[:, :3], _model_space(rgba[..., :3]))
    assert torch.equal(opaque.tensor[:, 3], torch.ones(1, 12, 20)) and opaque.notes == ["alpha added (opaque)"]

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 is transparent
    got = image_to_tensor(palette, channels=4).tensor
    assert got[0, 3].tolist() == [[1.0, -1.0], [-1.0, 1.0]] and got[0, 0, 0, 0] == 1.0


def test_sources_read_to_the_channel_count(tmp_path: Path) -> None:
    Image.fromarray(_rgba_photo(), "RGBA").save(tmp_path / "a.png")
    source = open_source(str(tmp_path))
    assert source.load(0).shape == (3, 12, 20)
    assert torch.equal(source.load(0, 1), load_image(tmp_path / "a.png", channels=1).tensor[0])
    assert torch.equal(source.load(0, 4), load_image(tmp_path / "a.png", channels=4).tensor[0])


# --- writing and showing ---------------------------------------------------------------------------


def test_to_pil_and_save_write_the_channel_count_mode(tmp_path: Path) -> None:
    rgba = _rgba_photo()
    grey = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"))
    assert to_pil(_model_space(grey)).mode == "L" and to_pil(_model_space(rgba)).mode == "RGBA"
    for name, pixels in (("grey.png", grey), ("rgba.png", rgba), ("rgba.webp", rgba), ("rgba.tif", rgba)):
        dest = save_image(_model_space(pixels), tmp_path / name)
        with Image.open(dest) as img:
            assert img.mode == ("L" if pixels.ndim == 2 else "RGBA"), name
            assert np.array_equal(np.asarray(img), pixels), name  # 8-bit survives exactly
    for name in ("rgba.jpg", "rgba.bmp"):
        with pytest.raises(UserError, match="keeps no alpha channel"):
            save_image(_model_space(rgba), tmp_path / name)
    with pytest.raises(ValueError, match="C 1, 3 or 4"):
        to_pil(torch.zeros(2, 4, 4))


def test_composites_are_rgb_with_grey_panels_and_transparency_over_a_checkerboard() -> None:
    rgba = _rgba_photo(2 * CHECKER, CHECKER + 3)
    shown = np.asarray(for_display(_model_space(rgba)))
    assert shown.shape == (CHECKER + 3, 2 * CHECKER, 3)
    # Fully transparent pixels show the board: two shades alternating every CHECKER pixels.
    assert shown[0, 0].tolist() == [204] * 3 and shown[CHECKER, 0].tolist() == [255] * 3
    assert np.array_equal(shown[:, -1], rgba[:, -1, :3])  # opaque pixels are the image
    grey = torch.rand(1, 1, 9, 9) * 2 - 1
    assert np.ptp(np.asarray(for_display(grey)), axis=2).max() == 0  # shown grey
    for images in (torch.rand(3, 1, 9, 9) * 2 - 1, torch.rand(3, 4, 9, 9) * 2 - 1):
        assert image_grid(images, 2).mode == "RGB"
        assert side_by_side(images[0], images[1]).mode == "RGB"
        assert labelled_rows([("row", list(images))]).mode == "RGB"


def test_preview_fit_takes_the_rgb_view() -> None:
    latents = torch.randn(2, 4, 3, 3)
    rgba = torch.rand(2, 4, 24, 24) * 2 - 1
    for got, want in ((rgb_fit_sums(latents, rgba), rgb_fit_sums(latents, rgba[:, :3])),
                      (rgb_fit_sums(latents, rgba[:, :1]), rgb_fit_sums(latents, rgba[:, :1].expand(2, 3, 24, 24)))):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
