"""Generate ``assets/testcard.png``: our own synthetic 512×384 sRGB test card for VAE round trips.

    python tools/make_testcard.py [--output assets/testcard.png]

Everything is drawn from code (numpy + Pillow's built-in font), so the card is free of third-party
rights and the output is byte-for-byte the same on every run with the same Pillow build. It holds the
things an image autoencoder tends to get wrong:

* smooth grey and colour gradients, horizontal and vertical (banding, colour shifts);
* a zone plate, a Siemens star and a frequency sweep (resolution limit and aliasing);
* 1-, 2- and 4-pixel checkerboards and line gratings (the finest detail an 8× latent must carry);
* text at several sizes, light-on-dark and dark-on-light (the classic VAE failure);
* colour patches: primaries, secondaries, approximate ColorChecker sRGB values, skin tones, greys;
* anti-aliased circles and a 1-pixel frame (edges at the image border, where padding matters).
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

WIDTH, HEIGHT = 512, 384
BACKGROUND = (64, 64, 64)  # dark grey: light and dark features both stand out from it
DEFAULT_OUTPUT = REPO / "assets" / "testcard.png"

# Approximate sRGB values of the 24 ColorChecker patches (row by row, as commonly published).
COLORCHECKER = [
    (115, 82, 68), (194, 150, 130), (98, 122, 157), (87, 108, 67), (133, 128, 177), (103, 189, 170),
    (214, 126, 44), (80, 91, 166), (193, 90, 99), (94, 60, 108), (157, 188, 64), (224, 163, 46),
    (56, 61, 150), (70, 148, 73), (175, 54, 60), (231, 199, 31), (187, 86, 149), (8, 133, 161),
    (243, 243, 242), (200, 200, 200), (160, 160, 160), (122, 122, 121), (85, 85, 85), (52, 52, 52),
]
PRIMARIES_SECONDARIES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0)]
SKIN_TONES = [(255, 224, 196), (241, 194, 157), (224, 172, 130), (198, 134, 66), (141, 85, 36), (92, 51, 23)]


def _to_u8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 with rounding."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _hue_ramp(length: int) -> np.ndarray:
    """(length, 3) uint8: fully saturated hues from red round the wheel back towards red."""
    return _to_u8(np.array([colorsys.hsv_to_rgb(i / length, 1.0, 1.0) for i in range(length)]))


def _gradients(card: np.ndarray) -> None:
    """Top bands (y 0–71) and the vertical ramps down the left edge (x 0–19)."""
    x = np.arange(WIDTH)
    card[0:16] = _to_u8(x / (WIDTH - 1))[None, :, None]  # smooth grey ramp, 0 → 255
    card[16:32] = (np.minimum(x // 32, 15) * 17).astype(np.uint8)[None, :, None]  # 16-step grey wedge
    card[32:48] = _hue_ramp(WIDTH)[None]
    ramp = _to_u8(x / (WIDTH - 1))
    for i, rows in enumerate((slice(48, 56), slice(56, 64), slice(64, 72))):  # red, green, blue ramps
        card[rows] = 0
        card[rows, :, i] = ramp[None]
    y = np.arange(HEIGHT - 72)
    card[72:, 0:10] = _to_u8(1 - y / (len(y) - 1))[:, None, None]  # white → black, top to bottom
    card[72:, 10:20] = _hue_ramp(len(y))[:, None]


def _zone_plate(size: int) -> np.ndarray:
    """(size, size) uint8 circular zone plate reaching 0.5 cycles/pixel at the middle of each edge."""
    r = np.arange(size) - (size - 1) / 2
    r2 = r[None, :] ** 2 + r[:, None] ** 2
    k = np.pi / size  # local frequency k·r/π = 0.5 cycles/px at r = size/2
    return _to_u8(0.5 + 0.5 * np.cos(k * r2))


def _siemens_star(size: int, spokes: int = 36, supersample: int = 4) -> np.ndarray:
    """(size, size) uint8 star of ``spokes`` black/white sectors on grey, anti-aliased by supersampling."""
    n = size * supersample
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n] - c
    radius = np.hypot(xx, yy)
    sector = np.floor((np.arctan2(yy, xx) + np.pi) / (2 * np.pi) * spokes).astype(int) % 2
    value = np.where(radius <= n / 2 - supersample, sector.astype(float), BACKGROUND[0] / 255)
    value = value.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return _to_u8(value)


def _patterns(card: np.ndarray) -> None:
    """Checkerboards, line gratings and a frequency sweep in the block at x 296–503, y 80–207."""
    yy, xx = np.mgrid[0:48, 0:48]
    patches = [
        ((xx + yy) % 2) * 255,  # 1-px checkerboard
        ((xx // 2 + yy // 2) % 2) * 255,  # 2-px checkerboard
        (xx % 2) * 255,  # 1-px vertical lines
        (yy % 2) * 255,  # 1-px horizontal lines
        ((xx // 4 + yy // 4) % 2) * 255,  # 4-px checkerboard
        ((xx // 2) % 2) * 255,  # 2-px vertical lines
        ((yy // 2) % 2) * 255,  # 2-px horizontal lines
        np.where((xx + yy) % 4 == 0, 255, 0),  # 1-px diagonal lines, period 4
    ]
    for i, patch in enumerate(patches):
        top, left = 80 + (i // 4) * 52, 296 + (i % 4) * 53
        card[top:top + 48, left:left + 48] = patch.astype(np.uint8)[..., None]
    # Frequency sweep: vertical bars from 0 to 0.5 cycles/px, left to right.
    length = 208
    x = np.arange(length)
    sweep = _to_u8(0.5 + 0.5 * np.cos(np.pi * x**2 / (2 * length)))
    card[186:208, 296:296 + length] = sweep[None, :, None]


def _patches(card: np.ndarray) -> None:
    """Colour patches, 30×30 with 2-px gaps: 4 rows of ColorChecker values, then primaries/secondaries."""
    colours = [*COLORCHECKER, *PRIMARIES_SECONDARIES]
    for i, colour in enumerate(colours):
        top, left = 216 + (i // 6) * 32, 28 + (i % 6) * 32
        card[top:top + 30, left:left + 30] = colour


def _font(size: int | None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font: scalable when FreeType is available, else the fixed bitmap font."""
    if size is None:
        return ImageFont.load_default_imagefont()
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _text(img: Image.Image) -> None:
    """Text at several sizes in the block at x 228–503, y 216–323."""
    draw = ImageDraw.Draw(img)
    lines = [
        (26, "sdvae test card", (255, 255, 255)),
        (18, "512x384 sRGB 8-bit", (255, 255, 255)),
        (14, "The quick brown fox jumps over", (255, 255, 0)),
        (11, "the lazy dog. 0123456789 @#%&*()[]{}", (0, 255, 255)),
        (None, "bitmap: Hamburgefonstiv 0123456789", (255, 255, 255)),
    ]
    y = 214
    for size, text, colour in lines:
        font = _font(size)
        draw.text((228, y), text, fill=colour, font=font)
        y += draw.textbbox((0, 0), text, font=font)[3] + 3
    # Dark text on a light box: the opposite polarity.
    draw.rectangle((228, y + 1, 503, y + 19), fill=(240, 240, 240))
    draw.text((231, y + 3), "Dark on light: Illegal1 O0 rn/m 8B", fill=(0, 0, 0), font=_font(12))


def _circles(img: Image.Image) -> None:
    """Anti-aliased circles (drawn at 4× and box-filtered down) in the block at x 228–503, y 330–379."""
    box = (228, 330, 504, 380)
    scale = 4
    region = img.crop(box)
    big = region.resize((region.width * scale, region.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)

    def circle(cx: float, cy: float, r: float, **kwargs) -> None:
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], **kwargs)

    for i, tone in enumerate(SKIN_TONES):  # filled skin-tone discs
        circle(15 + i * 30, 25, 13, fill=tone)
    for i, r in enumerate((23, 18, 13, 8, 4)):  # concentric rings, thinning inwards
        circle(216, 25, r, outline=(255, 255, 255), width=max(1, scale * (3 - i // 2) // 2))
    circle(255, 25, 15, fill=(255, 255, 255))
    circle(255, 25, 9, fill=(0, 0, 0))
    circle(255, 25, 3, fill=(255, 0, 0))
    img.paste(big.reduce(scale), box[:2])


def make_testcard() -> Image.Image:
    """Draw the card. Returns a 512×384 RGB image (deterministic)."""
    card = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    card[:] = BACKGROUND
    _gradients(card)
    card[80:208, 24:152] = _zone_plate(128)[..., None]
    card[80:208, 160:288] = _siemens_star(128)[..., None]
    _patterns(card)
    _patches(card)
    img = Image.fromarray(card, "RGB")
    _text(img)
    _circles(img)
    # 1-px white frame: a hard edge exactly at the border, where padding and tiling matter.
    ImageDraw.Draw(img).rectangle((0, 0, WIDTH - 1, HEIGHT - 1), outline=(255, 255, 255))
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the PNG")
    args = parser.parse_args(argv)

    from sdvae.images.write import save_image  # atomic write

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_testcard(), args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
