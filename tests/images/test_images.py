"""sdvae.images.load: every odd or broken input gives correct pixels or a one-line UserError naming the file.

All inputs are generated here in tmp_path (no shipped data); everything runs in a few seconds.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, load_tool
from sdvae.codec.codec import crop_to, pad_to_multiple
from sdvae.errors import UserError
from sdvae.images import load as images
from sdvae.images.compose import image_grid, labelled_rows, side_by_side
from sdvae.images.load import LoadedImage, check_min_size, image_to_tensor, is_image_file, load_image
from sdvae.images.write import save_image, to_pil


def _rgb_at(loaded: LoadedImage, y: int = 0, x: int = 0) -> list[float]:
    """RGB in [0, 1] of one pixel of a loaded image."""
    return ((loaded.tensor[0, :, y, x] + 1) / 2).tolist()


def _write_png16(path: Path, samples: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB/RGBA/LA).

    samples: (H, W, C) integers in [0, 65535]; color_type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA.
    """
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _photo(width: int = 20, height: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Plain input and the tensor convention


def test_plain_rgb_exact_and_round_trips_through_to_pil(tmp_path: Path) -> None:
    pixels = _photo(20, 12)
    path = tmp_path / "plain.png"
    Image.fromarray(pixels).save(path)

    loaded = load_image(path)

    assert loaded.size == (20, 12)
    assert loaded.tensor.shape == (1, 3, 12, 20) and loaded.tensor.dtype == torch.float32
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(loaded.tensor[0], expected, atol=1e-6)
    assert loaded.notes == []
    assert np.array_equal(np.asarray(to_pil(loaded.tensor)), pixels)  # 8-bit survives exactly


def test_image_to_tensor_in_memory() -> None:
    rgba = Image.new("RGBA", (3, 2), (0, 0, 0, 0))

    loaded = image_to_tensor(rgba)

    assert loaded.size == (3, 2) and (loaded.tensor == 1).all()
    assert loaded.notes == ["alpha composited on white"]


def test_image_to_tensor_truncated_buffer() -> None:
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 48)).save(buffer, "PNG")
    with Image.open(io.BytesIO(buffer.getvalue()[:-300])) as img, pytest.raises(UserError, match=r"^truncated"):
        image_to_tensor(img)


# --------------------------------------------------------------------------------------------------
# Files that are not usable images: one-line UserError naming the file


def _assert_user_error(path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _assert_user_error(tmp_path / "nope.png", "no such file")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "dir.png"
    folder.mkdir()
    _assert_user_error(folder, "folder")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_user_error(path, "empty")


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    _assert_user_error(path, "not an image")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_file_is_an_error_not_a_grey_image(tmp_path: Path, fmt: str, fraction: float) -> None:
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(_photo(64, 48)).save(full, fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * fraction)])
    message = _assert_user_error(path)
    assert "truncated or corrupt" in message or "not an image file" in message


def test_truncated_png_message_says_truncated(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_photo(64, 48)).save(full)
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[:-200])
    _assert_user_error(path, "truncated")


# --------------------------------------------------------------------------------------------------
# High bit depth


def test_16bit_grayscale_png_keeps_full_range_and_precision(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 1, 257, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"

    loaded = load_image(path)

    gray = loaded.tensor[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert gray[0, 0, 0] == -1.0 and gray[0, 0, 3] == 1.0
    assert gray[0, 0, 1] > -1.0  # 1/65535 is not rounded away to 8-bit black
    assert gray[0, 0, 2].item() == pytest.approx(257 / 65535 * 2 - 1, abs=1e-6)
    assert any("16-bit" in note for note in loaded.notes)


def test_mode_I_from_16bit_pgm_is_scaled_by_16bit_max(tmp_path: Path) -> None:
    # Pillow reads PGM with maxval > 255 as mode "I", rescaled to 0..65535.
    path = tmp_path / "gray12.pgm"
    path.write_bytes(b"P5 3 1 4095\n" + np.array([0, 2048, 4095], ">u2").tobytes())
    with Image.open(path) as img:
        assert img.mode == "I"

    loaded = load_image(path)

    assert _rgb_at(loaded, 0, 0) == [0.0, 0.0, 0.0]
    assert _rgb_at(loaded, 0, 1)[0] == pytest.approx(2048 / 4095, abs=1e-4)
    assert _rgb_at(loaded, 0, 2) == [1.0, 1.0, 1.0]


def test_mode_I_32bit_tiff_is_scaled_by_its_bit_depth(tmp_path: Path) -> None:
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)).save(path)

    loaded = load_image(path)

    values = [_rgb_at(loaded, 0, x)[0] for x in range(3)]
    assert values == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)  # signed: 2**31 - 1 is the maximum


@pytest.mark.parametrize("color_type", [2, 6])
def test_16bit_rgb_png_reduced_to_8bit_with_full_range(tmp_path: Path, color_type: int) -> None:
    channels = 3 if color_type == 2 else 4
    samples = np.zeros((1, 3, channels), dtype=np.uint16)
    samples[0, 0, :3] = 65535
    samples[0, 1, :3] = (65535, 0, 32896)  # 32896 = 128 * 257: exactly 128 in 8 bits
    if channels == 4:
        samples[..., 3] = 65535
    path = tmp_path / "rgb16.png"
    _write_png16(path, samples, color_type)

    loaded = load_image(path)

    assert _rgb_at(loaded, 0, 0) == [1.0, 1.0, 1.0]  # 65535 → +1.0, not 255/65535
    assert _rgb_at(loaded, 0, 1) == pytest.approx([1.0, 0.0, 128 / 255], abs=1e-6)
    assert _rgb_at(loaded, 0, 2) == [0.0, 0.0, 0.0]
    assert "16-bit input reduced to 8-bit" in loaded.notes


def test_16bit_gray_alpha_png_composited_on_white(tmp_path: Path) -> None:
    samples = np.array([[[0, 65535], [0, 0]]], dtype=np.uint16)  # opaque black, transparent black
    path = tmp_path / "la16.png"
    _write_png16(path, samples, 4)

    loaded = load_image(path)

    assert _rgb_at(loaded, 0, 0) == [0.0, 0.0, 0.0]
    assert _rgb_at(loaded, 0, 1) == [1.0, 1.0, 1.0]
    assert "16-bit input reduced to 8-bit" in loaded.notes and "alpha composited on white" in loaded.notes


def test_16bit_rgb_ppm(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.ppm"
    path.write_bytes(b"P6 2 1 65535\n" + np.array([65535, 0, 65535, 0, 0, 0], ">u2").tobytes())

    loaded = load_image(path)

    assert _rgb_at(loaded, 0, 0) == [1.0, 0.0, 1.0]
    assert _rgb_at(loaded, 0, 1) == [0.0, 0.0, 0.0]
    assert "16-bit input reduced to 8-bit" in loaded.notes


@pytest.mark.parametrize(("values", "expected", "scale_word"), [
    ([0.0, 0.25, 1.0], [0.0, 0.25, 1.0], "[0, 1]"),
    ([0.0, 127.5, 300.0], [0.0, 0.5, 1.0], "0..255"),
    ([-1.0, float("nan"), 0.5], [0.0, 0.0, 0.5], "[0, 1]"),
])
def test_float_images(tmp_path: Path, values: list[float], expected: list[float], scale_word: str) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([values], dtype=np.float32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"

    loaded = load_image(path)

    assert [_rgb_at(loaded, 0, x)[1] for x in range(3)] == pytest.approx(expected, abs=1e-6)
    assert any(scale_word in note for note in loaded.notes)
    assert torch.isfinite(loaded.tensor).all()


# --------------------------------------------------------------------------------------------------
# Palette, alpha, grayscale, CMYK, LAB


def _palette_image(transparent_index: int | None = None) -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([200, 10, 20, 5, 150, 250, 0, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


@pytest.mark.parametrize("fmt", ["png", "gif", "bmp"])
def test_palette_colours_preserved(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"pal.{fmt}"
    _palette_image().save(path)

    loaded = load_image(path)

    got = np.asarray(to_pil(loaded.tensor))[0]
    assert got.tolist() == [[200, 10, 20], [5, 150, 250], [0, 0, 0]]
    assert "palette converted" in loaded.notes


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"pal_t.{fmt}"
    img = _palette_image()
    img.save(path, transparency=1)

    loaded = load_image(path)

    got = np.asarray(to_pil(loaded.tensor))[0]
    assert got.tolist() == [[200, 10, 20], [255, 255, 255], [0, 0, 0]]
    assert "palette converted" in loaded.notes and "alpha composited on white" in loaded.notes


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 51]]], dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    loaded = load_image(path)

    assert loaded.tensor[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # alpha 0 → white
    assert _rgb_at(loaded, 0, 1) == pytest.approx([10 / 255, 20 / 255, 30 / 255], abs=1e-6)
    assert _rgb_at(loaded, 0, 2) == pytest.approx([0.8, 0.8, 0.8], abs=1e-6)  # black at 20% over white
    assert loaded.notes == ["alpha composited on white"]


def test_opaque_alpha_adds_no_note(tmp_path: Path) -> None:
    path = tmp_path / "opaque.png"
    Image.new("RGBA", (2, 2), (1, 2, 3, 255)).save(path)
    assert load_image(path).notes == []


def test_la_and_grey_transparency(tmp_path: Path) -> None:
    la = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [0, 255], [100, 255]]], dtype=np.uint8), "LA").save(la)
    trns = tmp_path / "trns.png"
    Image.fromarray(np.array([[7, 100]], dtype=np.uint8), "L").save(trns, transparency=7)

    la_img, trns_img = load_image(la), load_image(trns)

    assert [_rgb_at(la_img, 0, x)[0] for x in range(3)] == pytest.approx([1.0, 0.0, 100 / 255])
    assert [_rgb_at(trns_img, 0, x)[0] for x in range(2)] == pytest.approx([1.0, 100 / 255])
    assert "alpha composited on white" in la_img.notes and "alpha composited on white" in trns_img.notes


@pytest.mark.parametrize(("mode", "data"), [
    ("PA", bytes([0, 0, 0, 255])),  # palette index 0 (black), alpha 0 / 255
    ("La", bytes([0, 0, 0, 255])),  # premultiplied grey + alpha
    ("RGBa", bytes([0, 0, 0, 0, 0, 0, 0, 255])),
])
def test_other_alpha_modes_composited_on_white(mode: str, data: bytes) -> None:
    # Pillow cannot write these modes to files, so test the conversion step directly.
    img = Image.frombytes(mode, (2, 1), data)
    if mode == "PA":
        img.putpalette([0, 0, 0] * 256)
    notes: list[str] = []

    rgb = images._to_rgb_array(img, 8, notes)

    assert rgb[0, 0].tolist() == [1.0, 1.0, 1.0] and rgb[0, 1].tolist() == [0.0, 0.0, 0.0]
    assert "alpha composited on white" in notes


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 100, 100), ("1", 1, 255), ("1", 0, 0)])
def test_grayscale_to_rgb(tmp_path: Path, mode: str, value: int, expected: int) -> None:
    path = tmp_path / f"gray_{mode}.png"
    Image.new(mode, (3, 2), value).save(path)

    loaded = load_image(path)

    assert np.asarray(to_pil(loaded.tensor)).tolist() == [[[expected] * 3] * 3] * 2
    assert any("converted to RGB" in note for note in loaded.notes)


@pytest.mark.parametrize("fmt", ["jpg", "tif"])
def test_cmyk_converted(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cmyk.{fmt}"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path)  # pure cyan

    loaded = load_image(path)

    assert _rgb_at(loaded, 4, 4) == pytest.approx([0.0, 1.0, 1.0], abs=0.02)
    assert "CMYK converted to RGB" in loaded.notes


def test_lab_tiff_converted_to_srgb(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    Image.new("LAB", (2, 2), (255, 128, 128)).save(path)  # L* = 100, a* = b* = 0: white

    loaded = load_image(path)

    assert _rgb_at(loaded) == pytest.approx([1.0, 1.0, 1.0], abs=0.02)
    assert "CIELAB converted to sRGB" in loaded.notes


# --------------------------------------------------------------------------------------------------
# Geometry: EXIF orientation, multi-frame files, size limits


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_exif_orientation_6_rotates(tmp_path: Path, fmt: str) -> None:
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:4, :4] = (255, 0, 0)  # red block at the stored top-left corner
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / f"rotated.{fmt}"
    img.save(path, exif=exif.tobytes())

    loaded = load_image(path)

    assert loaded.size == (10, 20) and loaded.tensor.shape == (1, 3, 20, 10)
    assert _rgb_at(loaded, 1, 8) == pytest.approx([1.0, 0.0, 0.0], abs=0.1)  # now at the top-right
    assert _rgb_at(loaded, 1, 1) == pytest.approx([0.0, 0.0, 0.0], abs=0.1)
    assert "EXIF rotation applied (orientation 6)" in loaded.notes


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("junk", [b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12", b"garbage"])
def test_corrupt_exif_is_a_note_not_an_error(tmp_path: Path, fmt: str, junk: bytes) -> None:
    path = tmp_path / f"bad_exif.{fmt}"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path, exif=junk)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        loaded = load_image(path)

    assert loaded.size == (4, 4)
    assert _rgb_at(loaded) == pytest.approx([1.0, 0.0, 0.0], abs=0.02)
    assert all("\n" not in note for note in loaded.notes)


@pytest.mark.parametrize("fmt", ["gif", "tif"])
def test_multi_frame_uses_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:])

    loaded = load_image(path)

    assert _rgb_at(loaded, 2, 3) == pytest.approx([1.0, 0.0, 0.0], abs=0.02)
    assert "first of 3 frames used" in loaded.notes


@pytest.mark.parametrize(("width", "height"), [(15, 10), (30, 10)])  # warning zone, hard-error zone
def test_decompression_bomb_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   width: int, height: int) -> None:
    path = tmp_path / "huge.png"
    Image.new("RGB", (width, height), (0, 255, 0)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 100 pixels: warning above, error above 200

    message = _assert_user_error(path, f"{width}×{height}", "safety limit")
    assert "Traceback" not in message
    assert "--tile" not in message  # advice is the caller's: encode-dataset has no --tile (sdvae.cli.options adds it)
    assert Image.MAX_IMAGE_PIXELS == 100

    loaded = load_image(path, allow_huge=True)

    assert loaded.size == (width, height)
    assert _rgb_at(loaded) == [0.0, 1.0, 0.0]
    assert Image.MAX_IMAGE_PIXELS == 100  # the global limit is restored


def test_bomb_limit_restored_when_decoding_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_photo(30, 10)).save(full)
    path = tmp_path / "huge_cut.png"
    path.write_bytes(full.read_bytes()[:-100])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    _assert_user_error(path, "truncated", allow_huge=True)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_check_min_size(tmp_path: Path) -> None:
    check_min_size((8, 8), 8, tmp_path / "ok.png")
    for size in ((7, 100), (100, 7), (1, 1)):
        with pytest.raises(UserError, match=r"tiny\.png: image is \d+×\d+ pixels, smaller than one latent cell"):
            check_min_size(size, 8, tmp_path / "tiny.png")


def test_is_image_file() -> None:
    for name in ("a.png", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.tif", "g.TIFF", "h.gif", Path("x/y.Png")):
        assert is_image_file(name)
    for name in ("a.txt", "b", "c.png.bak", ".png", "d.svg"):
        assert not is_image_file(name)


# --------------------------------------------------------------------------------------------------
# to_pil, save_image, side_by_side


def test_to_pil_rounds_and_clamps() -> None:
    levels = torch.tensor([-2.0, -1.0, 0.0, 1 / 127.5 - 1 - 1e-4, 1.0, 5.0, float("nan")])
    x = levels.view(1, 1, 1, -1).expand(1, 3, 2, -1)

    out = np.asarray(to_pil(x))

    assert out.shape == (2, 7, 3) and out.dtype == np.uint8
    # 0.0 → 127.5 → 128 (round half to even gives 128); 0.99987 → 1 (rounding, not truncation to 0)
    assert out[0, :, 0].tolist() == [0, 0, 128, 1, 255, 255, 128]
    assert np.array_equal(np.asarray(to_pil(x[0])), out)  # (3,H,W) accepted too
    with pytest.raises(ValueError):
        to_pil(torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize(("ext", "exact"), [(".png", True), (".bmp", True), (".tif", True), (".tiff", True),
                                            (".webp", True), (".jpg", False), (".JPEG", False)])
def test_save_formats_atomic(tmp_path: Path, ext: str, exact: bool) -> None:
    pixels = _photo(16, 12)
    dest = tmp_path / f"out{ext}"

    returned = save_image(Image.fromarray(pixels), dest)

    assert returned == dest
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no temp file left behind
    with Image.open(dest) as img:
        expected_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext.lower(),
                                                                                               ext[1:].upper())
        assert img.format == expected_format
        back = np.asarray(img.convert("RGB")).astype(int)
    if exact:
        assert np.array_equal(back, pixels)
    else:
        assert np.abs(back - pixels).mean() < 6


def test_save_tensor_and_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "t.png"
    save_image(Image.new("RGB", (4, 4), "red"), dest)
    save_image(torch.zeros(1, 3, 4, 4), dest)  # overwriting a non-protected file is fine

    with Image.open(dest) as img:
        assert np.asarray(img).tolist() == [[[128] * 3] * 4] * 4
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_save_unknown_extension(tmp_path: Path) -> None:
    for name in ("out.xyz", "out"):
        with pytest.raises(UserError, match="unknown image extension"):
            save_image(Image.new("RGB", (2, 2)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_protected_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.png"
    Image.new("RGB", (4, 4), "blue").save(src)
    original = src.read_bytes()
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(src)
    monkeypatch.chdir(tmp_path)

    for dest in (src, tmp_path / "sub" / ".." / "in.png", Path("in.png"), link):
        with pytest.raises(UserError, match="refusing to overwrite the input") as info:
            save_image(Image.new("RGB", (4, 4)), dest, protect=[src])
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="refusing"):
        save_image(Image.new("RGB", (4, 4)), src, protect=["in.png"])  # relative protect path

    assert src.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "link.png", "sub"]


def test_save_into_missing_folder_or_onto_folder(tmp_path: Path) -> None:
    save_image(Image.new("RGB", (2, 2)), tmp_path / "missing" / "out.png")
    assert Image.open(tmp_path / "missing" / "out.png").size == (2, 2)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "dir.png")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "keep.png"
    Image.new("RGB", (4, 4), "green").save(dest)
    before = dest.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(UserError, match=r"keep\.png: cannot write \(No space left on device\)"):
        save_image(Image.new("RGB", (4, 4)), dest)

    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_side_by_side_layout() -> None:
    a = Image.new("RGB", (200, 30), (255, 0, 0))
    b = Image.new("RGB", (200, 20), (0, 0, 255))

    out = side_by_side(a, b)

    assert out.mode == "RGB" and out.width == 200 + 4 + 200
    label_h = out.height - 30
    assert label_h > 0
    arr = np.asarray(out)
    assert (arr[label_h:, :200] == (255, 0, 0)).all()
    assert (arr[label_h:label_h + 20, 204:] == (0, 0, 255)).all()
    assert (arr[label_h + 20:, 204:] == 255).all()  # shorter image: white below it
    assert (arr[label_h:, 200:204] == 255).all()  # the gap
    assert (arr[:label_h, :200] < 128).any() and (arr[:label_h, 204:] < 128).any()  # both labels drawn


def test_side_by_side_small_images_and_tensors() -> None:
    out = side_by_side(torch.zeros(1, 3, 8, 8), torch.ones(3, 8, 8), labels=("a long label here", "b"))
    assert out.width > 16  # panels widen to fit the labels
    arr = np.asarray(out)
    assert (arr[-8:, :8] == 128).all()


# --------------------------------------------------------------------------------------------------
# pad_to_multiple / crop_to


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 5), (7, 9), (8, 8), (13, 17), (16, 3)])
def test_pad_crop_round_trip(height: int, width: int) -> None:
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))

    padded, size = pad_to_multiple(x, 8)

    assert size == (height, width)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert padded.shape[-2] - height < 8 and padded.shape[-1] - width < 8
    assert torch.equal(crop_to(padded, size), x)


def test_pad_reflects_where_possible_and_replicates_otherwise() -> None:
    x = torch.arange(13 * 3, dtype=torch.float32).view(1, 1, 3, 13)

    padded, _ = pad_to_multiple(x, 8)

    assert padded.shape == (1, 1, 8, 16)
    # width 13 → 16: reflect (column 13 mirrors column 11, not 12)
    assert torch.equal(padded[..., :3, 13:], x[..., [11, 10, 9]])
    # height 3 → 8: 5 rows of padding cannot be reflected from 3 rows, so the last row is repeated
    assert torch.equal(padded[..., 3:, :], padded[..., 2:3, :].expand(1, 1, 5, 16))


def test_pad_noop_and_unbatched() -> None:
    x = torch.rand(3, 16, 24)
    same, size = pad_to_multiple(x, 8)
    assert same is x and size == (16, 24)
    padded, size = pad_to_multiple(torch.rand(3, 10, 10), 8)
    assert padded.shape == (3, 16, 16) and size == (10, 10)
    with pytest.raises(ValueError):
        crop_to(padded, (17, 16))


# --------------------------------------------------------------------------------------------------
# The shipped test card


def test_testcard_asset_matches_generator() -> None:
    module = load_tool("make_testcard")
    asset = REPO / "assets" / "testcard.png"

    card = module.make_testcard()
    loaded = load_image(asset)

    assert asset.stat().st_size < 600_000
    assert card.size == loaded.size == (512, 384) and loaded.notes == []
    assert np.array_equal(np.asarray(card), np.asarray(module.make_testcard()))  # deterministic
    # Equal to the committed PNG except, at most, a few text pixels from another FreeType build.
    differs = (np.asarray(card) != np.asarray(to_pil(loaded.tensor))).any(axis=2)
    assert differs.mean() < 0.02



def test_image_grid_and_labelled_rows_sizes():
    images = torch.zeros(5, 3, 16, 12)
    grid = image_grid(images, nrow=3, padding=2)
    assert grid.size == (3 * 14 + 2, 2 * 18 + 2)
    assert grid.getpixel((0, 0)) == (255, 255, 255) and grid.getpixel((2, 2)) == (128, 128, 128)
    strip = labelled_rows([("linear", images[:4]), ("spherical", images[:4])], padding=2)
    assert strip.height == 2 * 18 + 2 and strip.width > 4 * 14
