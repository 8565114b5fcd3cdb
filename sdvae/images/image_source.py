"""The interface every image collection implements (folders, datasets, WebDataset shards): a fixed-order
sequence decoded on demand. :func:`sdvae.images.sources.open_source` picks the implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ImageSource(Sequence):
    """A fixed-order collection of images; ``len(src)`` items, each decoded on demand.

    Subclasses implement :meth:`load`, :meth:`name` and :meth:`describe`. Sources must be picklable
    (DataLoader workers may receive a copy) and cheap to index (no decoding in ``__init__``).
    """

    ref: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> torch.Tensor:  # Sequence protocol; same as load
        return self.load(i)

    def load(self, i: int, channels: int = 3) -> torch.Tensor:
        """Decode image ``i`` with ``channels`` image channels (the model's; :func:`load_image`'s conversions).

        Returns:
            (C,H,W) float32 in [-1,1] at the file's own size: grayscale, RGB (alpha composited on white)
            or RGBA (alpha kept) for C = 1, 3, 4.

        Raises:
            UserError: the image cannot be decoded (message names it); IndexError for a bad ``i``.
        """
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Human-readable identity of item ``i`` for logs (relative path or ``dataset[i]``)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the run log, e.g. ``image folder data/ (1,234 images)``."""
        raise NotImplementedError

    # Problems found while opening that did not stop it (e.g. a truncated tar shard), one line each.
    notes: Sequence[str] = ()

    # Carried columns: values that travel with each image (captions, labels) into derived datasets
    # such as ``sdvae encode-dataset``'s output. Training ignores them.
    carry: tuple[str, ...] = ()

    def key(self, i: int) -> str:
        """Stable identity of item ``i`` within the source (relative path, or the row index as a string)."""
        return str(self._check(i))

    def extras(self, i: int) -> dict[str, Any]:
        """Values of the carried columns for item ``i`` (``{}`` when nothing is carried)."""
        self._check(i)
        return {}

    def extra_features(self) -> Any:
        """``datasets.Features`` of the carried columns (None when nothing is carried)."""
        return None

    def fingerprint(self) -> str:
        """A short string that changes when the item list changes (used to refuse resuming on other data)."""
        return f"{type(self).__name__}:{len(self)}"

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.ref}: index {i} out of range for {len(self)} images")
        return i
