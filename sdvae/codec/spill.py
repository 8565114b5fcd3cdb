"""Activation storage for exact tiling: in memory, or spilled to temporary files when large."""

from __future__ import annotations

import os
import tempfile

import torch


class SpillFiles:
    """Raw files for on-disk activations, in a private folder under ``tmp_dir``, recycled between stores.

    A closed store's file goes to the next store instead of being deleted: rewriting pages already in
    the page cache is several times faster than filling fresh ones (no page allocation or zeroing, no
    new filesystem blocks). Files are unlinked as soon as they are opened, so nothing is left behind
    even after a crash.
    """

    def __init__(self, tmp_dir: str | os.PathLike[str] | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="sdvae-tiles-", dir=tmp_dir)
        self._free: dict[int, int] = {}  # fd -> size in bytes
        self._all: list[int] = []

    def take(self, nbytes: int) -> int:
        """A file descriptor of a file of at least ``nbytes`` bytes."""
        if self._free:
            fd = max(self._free, key=self._free.__getitem__)  # the largest: reuses the most pages
            size = self._free.pop(fd)
        else:
            path = os.path.join(self._dir.name, f"spill{len(self._all)}.raw")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)
            self._all.append(fd)
            size = 0
        if size < nbytes:
            os.ftruncate(fd, nbytes)
        return fd

    def give(self, fd: int) -> None:
        """Return a file for reuse."""
        self._free[fd] = os.fstat(fd).st_size

    def close(self) -> None:
        """Close every file (open stores included) and remove the folder."""
        for fd in self._all:
            os.close(fd)
        self._all, self._free = [], {}
        self._dir.cleanup()


class TensorStore:
    """One activation of one image, shape (1, C, H, W), in RAM or in a raw file on disk.

    On disk the layout is (H, W, C), so a tile's row is one contiguous byte range and a tile with its
    halo is read with one ``preadv`` per row (one in all for full-width tiles). Plain reads rather
    than ``np.memmap``, because mapped pages count in the process RSS while the page cache does not.

    Per-channel count/mean/M2 are merged (Chan's parallel algorithm, float64) on every write, so the
    exact global GroupNorm statistics are known as soon as the store is complete.

    Args:
        channels, height, width: the activation's shape.
        dtype: element type of the stored values.
        spill: keep the values in a file from these; ``None`` keeps them in RAM.
        data: an existing (1, C, H, W) tensor to wrap (no copy; no statistics are computed).
    """

    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype, *,
                 spill: SpillFiles | None = None, data: torch.Tensor | None = None):
        self.shape = (channels, height, width)
        self.dtype = dtype
        self._count = 0
        self._mean = torch.zeros(channels, dtype=torch.float64)
        self._m2 = torch.zeros(channels, dtype=torch.float64)
        self._spill = spill
        self._fd: int | None = None
        self._data: torch.Tensor | None = data
        if spill is not None:
            self._fd = spill.take(channels * height * width * dtype.itemsize)
        elif data is None:
            # Channels-last like the disk layout: convs then read and write one layout (no reorders).
            self._data = torch.empty((1, channels, height, width), dtype=dtype, memory_format=torch.channels_last)

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Rows [y0, y1) × columns [x0, x1) as a (1, C, y1-y0, x1-x0) CPU tensor (may be a view)."""
        if self._fd is None:
            return self._data[:, :, y0:y1, x0:x1]
        c = self.shape[0]
        buf = torch.empty((y1 - y0, (x1 - x0) * c * self.dtype.itemsize), dtype=torch.uint8)
        self._io(os.preadv, buf.numpy(), y0, x0)
        # bytes -> (1, h, w, C) -> (1, C, h, w): a channels-last view, no copy. (Not unsqueeze(0) of
        # (C, h, w): oneDNN takes its odd batch stride for NCHW and then writes NCHW outputs.)
        return buf.view(self.dtype).view(1, y1 - y0, x1 - x0, c).permute(0, 3, 1, 2)

    def write(self, y0: int, x0: int, tile: torch.Tensor) -> None:
        """Store a (1, C, h, w) tile (any device) at rows y0.., columns x0.., updating the statistics."""
        self._accumulate(tile)
        tile = tile.to("cpu", self.dtype)
        _, _, h, w = tile.shape
        if self._fd is None:
            self._data[:, :, y0:y0 + h, x0:x0 + w] = tile
        else:  # no copy when the tile is channels-last already (see _Runner._load)
            self._io(os.pwritev, tile[0].permute(1, 2, 0).contiguous().view(torch.uint8).numpy().reshape(h, -1),
                     y0, x0)

    def _io(self, op, rows, y0: int, x0: int) -> None:
        """``op`` (preadv/pwritev) on (h, bytes) uint8 ``rows`` at pixel (y0, x0): one call per row,
        or one in all for a full-width tile."""
        c, _, w = self.shape
        pixel = c * self.dtype.itemsize
        for i, chunk in enumerate([rows] if x0 == 0 and rows.shape[1] == w * pixel else rows):
            done = op(self._fd, [chunk], ((y0 + i) * w + x0) * pixel)
            if done != chunk.nbytes:  # regular files only come up short at EOF or when the disk is full
                raise OSError(f"short {op.__name__} on a spill file ({done} of {chunk.nbytes} bytes)")

    def _accumulate(self, tile: torch.Tensor) -> None:
        # Tile moments in fp32, two-pass (accurate), merged in float64: robust even when mean >> std,
        # unlike summing x and x² over the whole image. (Hand-written: ~1.6× faster than var_mean.)
        t = tile.float()
        mean = t.mean(dim=(0, 2, 3), keepdim=True)
        m2 = (t - mean).square_().sum(dim=(0, 2, 3)).double().cpu()
        mean = mean.flatten().double().cpu()
        n = tile.shape[2] * tile.shape[3]
        total = self._count + n
        delta = mean - self._mean
        self._mean += delta * (n / total)
        self._m2 += m2 + delta.square() * (self._count * n / total)
        self._count = total

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (C,) float64 mean and biased variance of each channel's GroupNorm group."""
        c, h, w = self.shape
        if self._count != h * w:
            raise RuntimeError("GroupNorm statistics requested from an incompletely written store")
        mean = self._mean.view(groups, -1)
        var = (self._m2 / self._count).view(groups, -1)
        group_mean = mean.mean(1, keepdim=True)
        # Equal counts per channel: group variance = mean of (channel var + squared mean offset).
        group_var = (var + (mean - group_mean).square()).mean(1, keepdim=True)
        return group_mean.expand_as(mean).reshape(c), group_var.expand_as(mean).reshape(c)

    def close(self) -> None:
        """Free the values (RAM) or hand the file back for reuse (disk). Idempotent."""
        self._data = None
        if self._fd is not None:
            self._spill.give(self._fd)
            self._fd = None
