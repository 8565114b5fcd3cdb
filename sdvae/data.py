"""Training and validation images for ``tools/train.py``: sources, augmentation, resumable sharding.

Three pieces, each deterministic on its own so that a killed-and-resumed run sees exactly the
batches of an uninterrupted one, whatever the number of processes or DataLoader workers:

* :func:`open_source` turns ``data.train`` / ``data.val`` (image folder, local ``save_to_disk``
  folder, parquet file/glob, or Hugging Face Hub dataset name) into an :class:`ImageSource`: a
  fixed-order sequence whose ``load(i)`` decodes one image or raises :class:`UserError`.
* :class:`ResumableSampler` decides *which* images each process gets at each step: a pure function
  of (seed, step, rank), so resuming is "start at step k", not "replay the RNG".
* :class:`TrainDataset` decides *how* each image is cropped/flipped: a pure function of
  (seed, epoch, index) through a private ``torch.Generator``, never the global RNG, so worker count
  and scheduling order cannot change a pixel.

Unreadable images never stop a run: they are replaced (deterministically) by another image,
counted, and reported through :class:`SkipLog` in the main process.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sdvae.config import DataConfig
from sdvae.errors import UserError
from sdvae.images import image_to_tensor, is_image_file, load_image

log = logging.getLogger(__name__)

# Files the datasets library writes next to the arrow shards of `save_to_disk`.
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_GLOB_CHARS = set("*?[")
# Seed of the held-out validation split: fixed (not train.seed) so runs with different seeds
# are validated on the same images and their metrics stay comparable.
VAL_SPLIT_SEED = 0


def _mix(*parts: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints/strings (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


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

    def load(self, i: int) -> torch.Tensor:
        """Decode image ``i``.

        Returns:
            (3,H,W) float32 RGB in [-1,1] at the file's own size (alpha composited on white).

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

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.ref}: index {i} out of range for {len(self)} images")
        return i


class FolderSource(ImageSource):
    """Image files under a folder (recursive), sorted by relative POSIX path.

    Hidden files and folders (``.DS_Store``, macOS ``._name.jpg`` resource forks, ``.cache``) are
    ignored: they are never meant as training data and the ``._*.jpg`` ones are not even images.
    """

    def __init__(self, root: str | Path, files: list[str] | None = None):
        self.root = Path(root)
        self.ref = str(root)
        if files is None:
            files = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if not any(part.startswith(".") for part in p.relative_to(self.root).parts)
                and p.is_file() and is_image_file(p)
            )
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        path = self.root / self.files[self._check(i)]
        try:
            return load_image(path).tensor[0]
        except UserError:
            raise
        except Exception as err:  # a decoder bug on one odd file must not end a long run
            raise UserError(f"{path}: unreadable image ({type(err).__name__}: {_first_line(err)})") from None

    def name(self, i: int) -> str:
        return self.files[self._check(i)]

    def describe(self) -> str:
        return f"image folder {self.ref} ({len(self):,} images)"


class DatasetSource(ImageSource):
    """One image column of a Hugging Face ``datasets.Dataset``.

    The column is read undecoded (``Image(decode=False)``) and decoded here, so a corrupt row raises
    a :class:`UserError` for that row only instead of an exception from inside ``datasets``.
    """

    def __init__(self, dataset: Any, column: str, ref: str, kind: str):
        import datasets

        if column not in dataset.column_names:
            raise UserError(f"{ref}: no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                            "set data.image_column")
        dataset = dataset.select_columns([column])  # never decode/copy the other columns
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # metadata-only change
        self.dataset, self.column, self.ref, self.kind = dataset, column, ref, kind

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> torch.Tensor:
        value = self.dataset[self._check(i)][self.column]
        where = self.name(i)
        if isinstance(value, dict) and value.get("path") and not value.get("bytes"):
            where = f"{where} ({value['path']})"
        try:
            return _value_to_tensor(value)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            raise UserError(f"{where}: unreadable image ({type(err).__name__}: {_first_line(err)})") from None

    def name(self, i: int) -> str:
        return f"{self.ref}[{i}]"

    def describe(self) -> str:
        return f"{self.kind} {self.ref} ({len(self):,} images, column {self.column!r})"


def _value_to_tensor(value: Any) -> torch.Tensor:
    """Decode one dataset cell (encoded bytes, a path, a PIL image or an HWC array) to (3,H,W) in [-1,1]."""
    if isinstance(value, dict):  # datasets.Image(decode=False) storage, or a raw {bytes, path} struct
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise UserError("empty image cell")
    if isinstance(value, str):
        return load_image(value).tensor[0]
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(value)) as img:
            return _pil_to_tensor(img)
    if isinstance(value, Image.Image):
        return _pil_to_tensor(value)
    if isinstance(value, (np.ndarray, list)):
        return _pil_to_tensor(Image.fromarray(np.asarray(value)))
    if value is None:
        raise UserError("empty image cell")
    raise UserError(f"image cell of unsupported type {type(value).__name__}")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An opened PIL image → (3,H,W) float32 RGB in [-1,1], with exactly ``load_image``'s conversions."""
    return image_to_tensor(img).tensor[0]


def _load_hf(loader: Any, ref: str, what: str) -> Any:
    """Call a datasets loader, turning its exceptions into one-line UserErrors."""
    try:
        return loader()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{ref}: cannot load {what} ({type(err).__name__}: {_first_line(err)})") from None


def _pick_split(obj: Any, ref: str, split: str) -> Any:
    import datasets

    if isinstance(obj, (datasets.DatasetDict, dict)):
        if split not in obj:
            raise UserError(f"{ref}: no split {split!r} (splits: {', '.join(obj)}); set data.split")
        return obj[split]
    return obj


def _parquet_source(files: list[str], ref: str, column: str, cache_dir: str | None) -> DatasetSource:
    import datasets

    ds = _load_hf(lambda: datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir),
                  ref, "parquet data")
    return DatasetSource(ds, column, ref, "parquet")


def _looks_like_path(ref: str) -> bool:
    """True for refs that can only be meant as local paths (hub ids are ``name`` or ``org/name``)."""
    return (ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 1
            or ref.lower().endswith((".parquet", ".arrow", ".json", ".csv")))


def open_source(ref: str, image_column: str = "image", split: str = "train",
                cache_dir: str | None = None) -> ImageSource:
    """Open an image collection by reference.

    Args:
        ref: one of
            * an image folder (searched recursively; order = sorted relative paths),
            * a folder written by ``datasets``' ``save_to_disk`` (``Dataset`` or ``DatasetDict``),
            * a ``.parquet`` file, a glob of them (``data/*.parquet``), or a folder holding only parquet,
            * a Hugging Face Hub dataset name (needs network or the local datasets cache).
        image_column: column holding the images (datasets/parquet only); other columns are ignored.
        split: split to use for hub datasets and ``DatasetDict`` folders (parquet files are one split).
        cache_dir: ``datasets`` cache folder for parquet/hub loading (None: the library default).

    Returns:
        An :class:`ImageSource` with at least one item.

    Raises:
        UserError: missing path, no images, missing column/split, or an unreachable hub dataset.
    """
    if not ref:
        raise UserError("no data source given: set an image folder, a parquet file or a datasets name")
    if _GLOB_CHARS & set(ref):
        files = sorted(glob.glob(str(Path(ref).expanduser()), recursive=True))
        if not files:
            raise UserError(f"{ref}: no files match this pattern")
        if not all(f.lower().endswith(".parquet") for f in files):
            raise UserError(f"{ref}: patterns are supported for .parquet files only (pass an image folder instead)")
        source: ImageSource = _parquet_source(files, ref, image_column, cache_dir)
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            source = _open_folder(path, ref, image_column, split, cache_dir)
        elif path.is_file():
            if path.suffix.lower() != ".parquet":
                raise UserError(f"{ref}: not a folder or a .parquet file")
            source = _parquet_source([str(path)], ref, image_column, cache_dir)
        elif _looks_like_path(ref):
            raise UserError(f"{ref}: no such file or folder")
        else:
            source = _open_hub(ref, image_column, split, cache_dir)
    if len(source) == 0:
        raise UserError(f"{ref}: contains no images")
    return source


def _open_folder(path: Path, ref: str, column: str, split: str, cache_dir: str | None) -> ImageSource:
    if any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        import datasets

        ds = _load_hf(lambda: datasets.load_from_disk(str(path)), ref, "saved dataset")
        return DatasetSource(_pick_split(ds, ref, split), column, ref, "saved dataset")
    source = FolderSource(path)
    if len(source) == 0:
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:  # e.g. a downloaded hub snapshot: data/train-0000x.parquet
            return _parquet_source(parquet, ref, column, cache_dir)
        raise UserError(f"{ref}: no image files found (searched recursively)")
    return source


def _open_hub(name: str, column: str, split: str, cache_dir: str | None) -> ImageSource:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise UserError(
            f"{name}: not a local path, and hub dataset {name!r} (split {split!r}) could not be loaded "
            f"({type(err).__name__}: {_first_line(err)}); offline, pass a local image folder, "
            "save_to_disk folder or parquet file instead") from None
    return DatasetSource(_pick_split(ds, name, split), column, name, "hub dataset")


# --------------------------------------------------------------------------------------------------
# Augmentation and datasets
# --------------------------------------------------------------------------------------------------


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is exactly ``size`` (aspect kept), antialiased bicubic.

    Args:
        image: (3,H,W) float in [-1,1].
        size: target shorter side in pixels.

    Returns:
        (3,H',W') float32 in [-1,1] with ``min(H',W') == size`` (input returned as is if already so).
    """
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    if h <= w:
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    # Antialias matters when shrinking (aliasing would teach the VAE moiré); bicubic overshoots, so clamp.
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(-1, 1)


def _prepare(image: torch.Tensor, resolution: int, resize: int) -> torch.Tensor:
    """Apply the ``resize`` rule, then upscale anything still smaller than the crop."""
    if resize > 0:
        image = resize_shorter(image, max(resize, resolution))
    elif min(image.shape[-2:]) < resolution:
        image = resize_shorter(image, resolution)
    return image


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3,H,W) → (3,size,size) from the middle (H,W >= size)."""
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


class TrainDataset(Dataset):
    """Augmented training crops whose randomness is a pure function of (seed, epoch, index).

    Keys are ``(epoch, k)`` pairs as yielded by :class:`ResumableSampler` (a plain ``k`` means epoch 0);
    ``k`` indexes ``indices`` (the training subset of ``source``).

    Each item draws its crop offsets and flip from a private ``torch.Generator`` seeded with a hash of
    (seed, epoch, source index), so the same key gives the same tensor in any process or worker, and
    a new epoch gives a new crop.

    An unreadable image is replaced by another training image chosen deterministically from the same
    key (up to ``max_retries`` times); the failures travel with the item (``"skipped"``) so the main
    process can count and log them. Keeping the batch full avoids empty or ragged batches under DDP.
    """

    def __init__(self, source: ImageSource, resolution: int, resize: int = 0,
                 crop: Literal["random", "center"] = "random", flip: bool = True, seed: int = 0,
                 indices: Sequence[int] | None = None, max_retries: int = 8):
        """
        Args:
            source: where images come from.
            resolution: side R of the square crops.
            resize: resize the shorter side to this before cropping (0: keep the file's size).
                Images whose shorter side is still below R are resized up to R.
            crop: ``"random"`` (training) or ``"center"``.
            flip: random horizontal flips (p=0.5).
            seed: run seed.
            indices: source indices used for training (None: all).
            max_retries: replacement attempts for an unreadable image before the item is dropped.
        """
        if resolution <= 0:
            raise UserError(f"data.resolution must be positive, got {resolution}")
        if crop not in ("random", "center"):
            raise UserError(f"data.crop must be 'random' or 'center', got {crop!r}")
        self.source, self.resolution, self.resize = source, resolution, resize
        self.crop, self.flip, self.seed, self.max_retries = crop, flip, seed, max_retries
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def augment(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Resize/crop/flip one image.

        Args:
            image: (3,H,W) float in [-1,1].
            generator: the item's private generator.

        Returns:
            (3,R,R) float32 in [-1,1], contiguous.
        """
        r = self.resolution
        image = _prepare(image, r, self.resize)
        h, w = image.shape[-2:]
        # Always draw the same three numbers in the same order, whatever the options: the stream
        # (and so every other item's result) never depends on which branches were taken.
        top = int(torch.randint(h - r + 1, (1,), generator=generator))
        left = int(torch.randint(w - r + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)
        image = image[:, top:top + r, left:left + r] if self.crop == "random" else center_crop(image, r)
        if self.flip and flip:
            image = image.flip(-1)
        return image.float().contiguous()

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """One training item.

        Returns:
            ``{"pixels": (3,R,R) float32 in [-1,1] or None if unreadable, "index": source index,
            "skipped": [(name, message), ...] failures met on the way}``.
        """
        epoch, k = key if isinstance(key, tuple) else (0, key)
        skipped: list[tuple[str, str]] = []
        pick = None
        for attempt in range(self.max_retries + 1):
            if attempt == 0:
                index = self.indices[k]
            else:  # deterministic replacement: another training image, chosen from the same key
                if pick is None:
                    pick = _generator(self.seed, "replace", epoch, k)
                index = self.indices[int(torch.randint(len(self.indices), (1,), generator=pick))]
            try:
                image = self.source.load(index)
            except UserError as err:
                skipped.append((self.source.name(index), str(err)))
                continue
            generator = _generator(self.seed, "augment", epoch, index, attempt)
            return {"pixels": self.augment(image, generator), "index": index, "skipped": skipped}
        return {"pixels": None, "index": self.indices[k], "skipped": skipped}


class ValDataset(Dataset):
    """Deterministic validation crops: same ``resize`` rule as training, then a center R×R crop.

    Items are ``{"pixels": (3,R,R) float32 in [-1,1] or None, "index": source index, "skipped": [...]}``;
    unreadable images are dropped by :func:`collate` (no replacement: validation must not change set).
    """

    def __init__(self, source: ImageSource, resolution: int, resize: int = 0, indices: Sequence[int] | None = None):
        self.source, self.resolution, self.resize = source, resolution, resize
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        try:
            image = self.source.load(index)
        except UserError as err:
            return {"pixels": None, "index": index, "skipped": [(self.source.name(index), str(err))]}
        image = center_crop(_prepare(image, self.resolution, self.resize), self.resolution)
        return {"pixels": image.float().contiguous(), "index": index, "skipped": []}


def split_validation(num_items: int, val_count: int, seed: int = VAL_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Hold out ``val_count`` items for validation.

    Args:
        num_items: size N of the source.
        val_count: how many to hold out (0: none).
        seed: split seed (fixed by default so different run seeds validate on the same images).

    Returns:
        (train indices, val indices), both sorted, disjoint, covering range(N).

    Raises:
        UserError: fewer than ``val_count + 1`` items (nothing left to train on).
    """
    if val_count < 0:
        raise UserError(f"data.val_count must be >= 0, got {val_count}")
    if val_count >= num_items:
        raise UserError(f"only {num_items} images: cannot hold out data.val_count={val_count} for validation "
                        "and still train (lower data.val_count or set data.val)")
    perm = torch.randperm(num_items, generator=_generator(seed, "val-split")).tolist()
    val = sorted(perm[:val_count])
    held = set(val)
    return [i for i in range(num_items) if i not in held], val


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


class ResumableSampler:
    """Infinite, per-process index batches that can start at any global step.

    Each epoch is a seeded permutation of ``range(num_items)``; global batches of
    ``batch_size * world_size`` are cut from it and rank ``r`` takes slice ``[r*B, (r+1)*B)``, so ranks
    are disjoint and together cover exactly the 1-process global batch.

    * ``drop_last=True``: each epoch has ``num_items // global_batch`` steps; the remainder of the
      permutation (different images every epoch) is dropped.
    * ``drop_last=False``: epochs are concatenated into one stream, so a batch may straddle two
      epochs and no image is ever dropped (works even when ``num_items < global_batch``).

    Resuming is exact because batch ``k`` is a pure function of (seed, k): a resumed run constructs
    the sampler with ``start_step=k``. There is deliberately no "how far have I iterated" state: with
    DataLoader workers prefetching, the sampler runs ahead of the training loop, so only the training
    loop's step count is a correct resume position (see :meth:`state_for_step`).

    Yields:
        lists of ``batch_size`` ``(epoch, k)`` keys for :class:`TrainDataset`.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, start_step: int = 0):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if num_items <= 0:
            raise UserError("no training images")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        if drop_last and num_items < self.global_batch:
            raise UserError(f"{num_items} training images is less than one global batch "
                            f"({batch_size} per process × {world_size} processes)")
        self.start_step = start_step
        self._perms: dict[int, list[int]] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Global steps per pass over the data (fractional with ``drop_last=False``)."""
        if self.drop_last:
            return self.num_items // self.global_batch
        return self.num_items / self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (a pure function of (seed, epoch))."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # steps advance monotonically: keep the current and the next epoch
                self._perms.pop(min(self._perms))
            generator = _generator(self.seed, "epoch", epoch)
            self._perms[epoch] = torch.randperm(self.num_items, generator=generator).tolist()
        return self._perms[epoch]

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """All ranks' keys for global step ``step``, rank 0's first."""
        g, n = self.global_batch, self.num_items
        if self.drop_last:
            epoch, b = divmod(step, self.num_items // g)
            perm = self.permutation(epoch)
            return [(epoch, perm[j]) for j in range(b * g, (b + 1) * g)]
        out = []
        for p in range(step * g, (step + 1) * g):
            epoch, j = divmod(p, n)
            out.append((epoch, self.permutation(epoch)[j]))
        return out

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """This rank's keys for global step ``step``."""
        b = self.batch_size
        return self.global_batch_at(step)[self.rank * b:(self.rank + 1) * b]

    def state_for_step(self, step: int) -> dict[str, int]:
        """Resume state after the training loop has consumed ``step`` batches.

        Returns:
            ``{"step", "epoch", "position"}``: epoch and batch-within-epoch (drop_last) or item offset
            within the epoch (stream mode) of the next batch — for logs; ``step`` alone is enough.
        """
        if self.drop_last:
            epoch, position = divmod(step, self.num_items // self.global_batch)
        else:
            epoch, position = divmod(step * self.global_batch, self.num_items)
        return {"step": step, "epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_for_step` dict (next iteration starts at its step)."""
        self.start_step = int(state["step"])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


# --------------------------------------------------------------------------------------------------
# Batching, skip accounting, loaders
# --------------------------------------------------------------------------------------------------


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items, drop unreadable ones, and carry the failures along.

    Runs inside DataLoader workers, so skip information travels in the batch for the main process.

    Returns:
        ``{"pixels": (B',3,R,R) float32 in [-1,1] (None if no item was readable),
        "index": (B',) int64 source indices, "skipped": number of failed loads,
        "skipped_files": [(name, message), ...]}``.
    """
    good = [it for it in items if it["pixels"] is not None]
    failures = [s for it in items for s in it["skipped"]]
    return {
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "skipped": len(failures),
        "skipped_files": failures,
    }


class SkipLog:
    """Counts unreadable-image events in the main process and logs each file once.

    Args:
        path: optional text file; each newly seen bad file appends a ``name<TAB>message`` line.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.count = 0
        self.files: dict[str, str] = {}

    def record(self, name: str, message: str) -> None:
        self.count += 1
        if name in self.files:
            return
        self.files[name] = message
        log.warning("skipping unreadable image %s", message if name in message else f"{name}: {message}")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(f"{name}\t{' '.join(message.split())}\n")

    def update(self, batch: dict[str, Any]) -> None:
        """Record the failures a :func:`collate` batch carries."""
        for name, message in batch.get("skipped_files", ()):
            self.record(name, message)


class SkipLoggingLoader(DataLoader):
    """A DataLoader that feeds each batch's failures to a :class:`SkipLog` as batches come out.

    With ``require_pixels`` (training), a batch with no readable image at all raises a UserError:
    silently dropping it would shift every later step's data and break bit-exact resume.
    """

    def __init__(self, *args: Any, skip_log: SkipLog, require_pixels: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_log = skip_log
        self.require_pixels = require_pixels

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            self.skip_log.update(batch)
            if self.require_pixels and batch["pixels"] is None:
                example = batch["skipped_files"][0][1] if batch["skipped_files"] else "?"
                raise UserError(f"no readable image in a whole training batch ({self.skip_log.count} unreadable "
                                f"so far, e.g. {example}); check data.train")
            yield batch


@dataclass
class DataInfo:
    """What :func:`build_dataloaders` opened, for the run log (``str(info)`` is one line)."""

    train: str
    val: str
    train_images: int
    val_images: int
    global_batch: int
    steps_per_epoch: float
    skip_log: SkipLog = field(repr=False)

    def __str__(self) -> str:
        return (f"train {self.train} → {self.train_images:,} used, val {self.val} → {self.val_images:,} "
                f"images; global batch {self.global_batch}, {self.steps_per_epoch:,.1f} steps/epoch")


def build_dataloaders(cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                      start_step: int = 0, skip_log_path: str | Path | None = None,
                      cache_dir: str | None = None) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Training and validation loaders as configured.

    Args:
        cfg: the ``data`` section.
        batch_size: per-process micro-batch size B.
        seed: run seed (order and augmentation).
        rank, world_size: this process and the number of processes.
        start_step: micro-batches already consumed (``optimizer step × grad_accum`` at resume); the
            loader continues with exactly the next one.
        skip_log_path: where to append unreadable-file lines (None: log only).
        cache_dir: ``datasets`` cache folder (None: default).

    Returns:
        ``(train_loader, val_loader, info)``. The train loader is infinite and yields
        ``{"pixels": (B,3,R,R) in [-1,1], "index": (B,), "skipped": int, "skipped_files": [...]}``;
        the val loader is finite (center crops, batches of up to B, possibly zero batches).

    Raises:
        UserError: empty/invalid ``data.train``, too few images, or any :func:`open_source` error.
    """
    if not cfg.train:
        raise UserError("data.train is empty: set it to an image folder, a parquet file or a datasets name")
    train_source = open_source(cfg.train, cfg.image_column, cfg.split, cache_dir)
    if cfg.val:
        val_source = open_source(cfg.val, cfg.image_column, cfg.split, cache_dir)
        train_idx, val_idx = list(range(len(train_source))), list(range(len(val_source)))
        val_desc = val_source.describe()
    else:
        val_source = train_source
        train_idx, val_idx = split_validation(len(train_source), cfg.val_count)
        val_desc = f"{cfg.val_count} held out of train"

    train_ds = TrainDataset(train_source, cfg.resolution, cfg.resize, cfg.crop, cfg.flip, seed, train_idx)
    # Stream mode (no dropped tail): every image is used equally and tiny datasets still work.
    sampler = ResumableSampler(len(train_ds), batch_size, seed, rank, world_size, drop_last=False,
                               start_step=start_step)
    skip_log = SkipLog(skip_log_path)
    workers = max(0, cfg.num_workers)
    pin = torch.cuda.is_available()
    train_loader = SkipLoggingLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                     persistent_workers=workers > 0, pin_memory=pin, skip_log=skip_log,
                                     require_pixels=True)
    val_ds = ValDataset(val_source, cfg.resolution, cfg.resize, val_idx)
    # Validation runs rarely; workers are started per pass instead of idling between passes.
    val_loader = SkipLoggingLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                   num_workers=min(workers, math.ceil(len(val_ds) / batch_size)),
                                   pin_memory=pin, skip_log=skip_log)
    info = DataInfo(train_source.describe(), val_desc, len(train_ds), len(val_ds), sampler.global_batch,
                    sampler.steps_per_epoch, skip_log)
    return train_loader, val_loader, info
