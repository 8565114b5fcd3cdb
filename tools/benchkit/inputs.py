"""Benchmark inputs: one synthetic-image generator (tensors, PNG/JPEG files), folder crops, latents."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def synthetic_images(n: int, height: int, width: int | None = None, seed: int = 0, detail: int = 8,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` photo-like (n,3,H,W) images in [-1, 1]: smooth colour fields (bicubic-upsampled noise on a
    grid ``detail`` times coarser) plus fine grain. Deterministic per ``seed`` (or per ``generator``
    state). Speed does not depend on content; PNGs of them compress like photos, not like flat fields."""
    width = width or height
    gen = generator or torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(1, height // detail), max(1, width // detail), generator=gen)
    x = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1) * 2 - 1


def synthetic_batches(count: int, batch: int, resolution: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` (batch,3,R,R) batches drawn one after another from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [synthetic_images(batch, resolution, generator=gen) for _ in range(count)]


def to_uint8(image: torch.Tensor):
    """A (3,H,W) image in [-1, 1] as an (H,W,3) uint8 array."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_photo(path: Path, height: int, width: int | None = None, seed: int = 0, detail: int = 8, **save) -> Path:
    """One synthetic image as a file (format from the suffix; ``save``: PIL options such as quality)."""
    from PIL import Image

    Image.fromarray(to_uint8(synthetic_images(1, height, width, seed, detail)[0])).save(path, **save)
    return path


def write_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` JPEGs about size × 1.25·size with varied aspect ratios (what encode-dataset resizes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = size + int(rng.integers(0, size // 4 + 1)), size + int(rng.integers(size // 8, size // 2 + 1))
        write_photo(folder / f"{i:06d}.jpg", h, w, seed=seed * 100_003 + i, quality=90)


def folder_images(path: str, n: int, size: int) -> torch.Tensor:
    """The first ``n`` images of a folder, center-cropped to ``size`` (sdvae's validation crops)."""
    from sdvae.images.sources import open_source
    from sdvae.train.datasets import ValDataset

    data = ValDataset(open_source(path, "image", "train"), size, size, list(range(n)))
    return torch.stack([data[i]["pixels"] for i in range(len(data))])


def latents(size: int, seed: int = 0, channels: int = 4, factor: int = 8) -> torch.Tensor:
    """Seeded N(0, 1) latents of one ``size``² image."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, size // factor, size // factor, generator=gen)


def posterior_noise(count: int, batch: int, shape: tuple[int, int, int], seed: int = 1) -> list[torch.Tensor]:
    """``count`` seeded (batch, C, h, w) draws of the reparameterisation noise: every step gets the same."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen) for _ in range(count)]


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted by relative path), the first ``limit`` of them."""
    from sdvae.images.load import IMAGE_EXTENSIONS

    found = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return found[:limit] if limit is not None else found


def pack_shards(images: list[Path], folder: Path, shards: int) -> str:
    """Pack image files into ``shards`` WebDataset tar shards as img2dataset writes them; the SRC pattern.

    Shard k is ``folder/{k:05d}.tar``; the images are split in order into runs whose sizes differ by at most
    one. Each sample is ``KEY.<ext>`` (the file's own bytes, not re-encoded) then ``KEY.json`` (img2dataset's
    fields: key, url = the file's name, status, width, height); KEY is the shard number (5 digits) then the
    sample's place in it (4 digits or more), as img2dataset numbers them. Members carry mtime 0, so the same
    files give the same bytes. Each shard is written atomically.

    Returns:
        ``folder/{00000..NNNNN}.tar``, the brace range ``encode-dataset`` takes as SRC.
    """
    import io
    import json
    import tarfile

    from PIL import Image

    from sdvae.atomic import atomic_file

    if shards < 1 or len(images) < shards:
        raise ValueError(f"cannot pack {len(images)} images into {shards} shards (need 1 <= shards <= images)")
    base, extra = divmod(len(images), shards)
    digits = max(4, len(str(base)))
    start = 0
    for k in range(shards):
        part = images[start:start + base + (k < extra)]
        start += len(part)
        with atomic_file(Path(folder) / f"{k:05d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
            for i, path in enumerate(part):
                key = f"{k:05d}{i:0{digits}d}"
                with Image.open(path) as im:  # the header only: no pixel is decoded
                    width, height = im.size
                meta = {"key": key, "url": path.name, "status": "success", "error_message": None,
                        "width": width, "height": height, "original_width": width, "original_height": height}
                for name, data in ((f"{key}{path.suffix.lower()}", path.read_bytes()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"
