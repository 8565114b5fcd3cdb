"""Image sources: images from a folder, a ``save_to_disk`` folder, parquet, WebDataset tar shards or the Hub.

:func:`open_source` turns a reference (``data.train`` / ``data.val``: an image folder, a local
``save_to_disk`` folder, a parquet file/glob, or a Hugging Face Hub dataset name) into an
:class:`ImageSource`: a fixed-order sequence whose ``load(i, channels)`` decodes one image (to the model's
image channels: 1 grayscale, 3 RGB, 4 RGBA, see :mod:`sdvae.images.channels`) or raises :class:`UserError`.
The order depends on the source alone (sorted relative paths, dataset row order), which the resumable
sampling of :mod:`sdvae.train.datasets` relies on. Sources decode nothing up front and are picklable, so
DataLoader workers can each hold a copy. Dataset sources can also carry other columns (captions, labels:
``open_source(..., carry=None)`` and ``extras(i)``) for derived datasets such as ``sdvae encode-dataset``'s;
training carries none.
"""

from __future__ import annotations

import glob
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdvae.errors import UserError, first_line
from sdvae.images.image_source import ImageSource
from sdvae.images.load import image_to_tensor, is_image_file, load_image
from sdvae.images.webdataset import WebDatasetSource, is_shard_reference

# Files the datasets library writes next to the arrow shards of `save_to_disk`.
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_GLOB_CHARS = set("*?[")


# How the user of the training config names the choices open_source may find missing.
TRAINING_OPTIONS = {"split": "data.split", "image_column": "data.image_column"}


class _ChoiceError(UserError):
    """A split or column that does not exist; :func:`open_source` adds the option that sets it."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


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

    def load(self, i: int, channels: int = 3) -> torch.Tensor:
        path = self.root / self.files[self._check(i)]
        try:
            return load_image(path, channels=channels).tensor[0]
        except UserError:
            raise
        except Exception as err:  # a decoder bug on one odd file must not end a long run
            raise UserError(f"{path}: unreadable image ({first_line(err, with_type=True)})") from None

    def name(self, i: int) -> str:
        return self.files[self._check(i)]

    def key(self, i: int) -> str:
        return self.files[self._check(i)]

    def describe(self) -> str:
        return f"image folder {self.ref} ({len(self):,} images)"

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]
        return f"folder:{len(self)}:{digest}"


class DatasetSource(ImageSource):
    """One image column of a Hugging Face ``datasets.Dataset``.

    The column is read undecoded (``Image(decode=False)``) and decoded here, so a corrupt row raises
    a :class:`UserError` for that row only instead of an exception from inside ``datasets``.
    """

    def __init__(self, dataset: Any, column: str, ref: str, kind: str, carry: Sequence[str] | None = ()):
        """
        Args:
            dataset: a ``datasets.Dataset``.
            column: the image column.
            ref, kind: for messages (``ref`` as the user wrote it, ``kind`` e.g. ``"parquet"``).
            carry: other columns to carry through (:meth:`extras`); None: every other column.
        """
        datasets = _import_datasets()

        if column not in dataset.column_names:
            raise _ChoiceError(f"{ref}: no column {column!r} (columns: {', '.join(dataset.column_names)})",
                               "image_column")
        others = [c for c in dataset.column_names if c != column]
        carry = tuple(others if carry is None else carry)
        missing = [c for c in carry if c not in others]
        if missing:
            raise UserError(f"{ref}: cannot carry column(s) {', '.join(map(repr, missing))} "
                            f"(other columns: {', '.join(others) or 'none'})")
        # Carried columns live in their own view: the image view never decodes/copies them.
        self.carried = dataset.select_columns(list(carry)) if carry else None
        if self.carried is not None:  # images in carried columns travel as stored bytes, never decoded
            for name, feature in self.carried.features.items():
                if isinstance(feature, datasets.Image):
                    self.carried = self.carried.cast_column(name, datasets.Image(decode=False))
        self.carry = carry
        dataset = dataset.select_columns([column])  # never decode/copy the other columns
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # metadata-only change
        self.dataset, self.column, self.ref, self.kind = dataset, column, ref, kind

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int, channels: int = 3) -> torch.Tensor:
        value = self.dataset[self._check(i)][self.column]
        where = self.name(i)
        if isinstance(value, dict) and value.get("path") and not value.get("bytes"):
            where = f"{where} ({value['path']})"
        try:
            return _value_to_tensor(value, channels)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            raise UserError(f"{where}: unreadable image ({first_line(err, with_type=True)})") from None

    def name(self, i: int) -> str:
        return f"{self.ref}[{i}]"

    def describe(self) -> str:
        return f"{self.kind} {self.ref} ({len(self):,} images, column {self.column!r})"

    def extras(self, i: int) -> dict[str, Any]:
        return dict(self.carried[self._check(i)]) if self.carried is not None else {}

    def extra_features(self) -> Any:
        return self.carried.features if self.carried is not None else None

    def fingerprint(self) -> str:
        # datasets' fingerprint is derived from the data files (or save_to_disk state) and the
        # column selection above, so it is stable across processes for the same data.
        return f"dataset:{len(self)}:{self.dataset._fingerprint}"


def _value_to_tensor(value: Any, channels: int = 3) -> torch.Tensor:
    """Decode one dataset cell (encoded bytes, a path, a PIL image or an HWC array) to (C,H,W) in [-1,1]."""
    if isinstance(value, dict):  # datasets.Image(decode=False) storage, or a raw {bytes, path} struct
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise UserError("empty image cell")
    if isinstance(value, str):
        return load_image(value, channels=channels).tensor[0]
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(value)) as img:
            return _pil_to_tensor(img, channels)
    if isinstance(value, Image.Image):
        return _pil_to_tensor(value, channels)
    if isinstance(value, (np.ndarray, list)):
        return _pil_to_tensor(Image.fromarray(np.asarray(value)), channels)
    if value is None:
        raise UserError("empty image cell")
    raise UserError(f"image cell of unsupported type {type(value).__name__}")


def _pil_to_tensor(img: Image.Image, channels: int = 3) -> torch.Tensor:
    """An opened PIL image → (C,H,W) float32 in [-1,1], with exactly ``load_image``'s conversions."""
    return image_to_tensor(img, channels).tensor[0]


def _load_hf(loader: Any, ref: str, what: str) -> Any:
    """Call a datasets loader, turning its exceptions into one-line UserErrors."""
    try:
        return loader()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{ref}: cannot load {what} ({first_line(err, with_type=True)})") from None


def _pick_split(obj: Any, ref: str, split: str) -> Any:
    datasets = _import_datasets()

    if isinstance(obj, (datasets.DatasetDict, dict)):
        if split not in obj:
            raise _ChoiceError(f"{ref}: no split {split!r} (splits: {', '.join(obj)})", "split")
        return obj[split]
    return obj


def _parquet_source(files: list[str], ref: str, column: str, cache_dir: str | None,
                    carry: Sequence[str] | None = ()) -> DatasetSource:
    datasets = _import_datasets()

    ds = _load_hf(lambda: datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir),
                  ref, "parquet data")
    return DatasetSource(ds, column, ref, "parquet", carry)


def _looks_like_path(ref: str) -> bool:
    """True for refs that can only be meant as local paths (hub ids are ``name`` or ``org/name``)."""
    return (ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 1
            or ref.lower().endswith((".parquet", ".arrow", ".json", ".csv")))


def open_source(ref: str, image_column: str = "image", split: str = "train",
                cache_dir: str | None = None, carry: Sequence[str] | None = (),
                options: Mapping[str, str] = TRAINING_OPTIONS) -> ImageSource:
    """Open an image collection by reference.

    Args:
        ref: one of
            * an image folder (searched recursively; order = sorted relative paths),
            * a folder written by ``datasets``' ``save_to_disk`` (``Dataset`` or ``DatasetDict``),
            * a ``.parquet`` file, a glob of them (``data/*.parquet``), or a folder holding only parquet,
            * WebDataset tar shards: ``data/00000.tar``, ``data/{00000..00099}.tar``, ``data/*.tar`` or a
              ``.txt`` list of shard paths (:mod:`sdvae.images.webdataset`; other members are columns),
            * a Hugging Face Hub dataset name (needs network or the local datasets cache).
        image_column: column holding the images (datasets/parquet only).
        split: split to use for hub datasets and ``DatasetDict`` folders (parquet files are one split).
        cache_dir: ``datasets`` cache folder for parquet/hub loading (None: the library default).
        carry: other dataset columns to expose through ``extras(i)`` (captions, labels); None: all of
            them; ``()`` (the default, training): none. Image folders have no columns: naming one is an error.
        options: how the caller's user sets ``split`` and ``image_column`` (named in errors).

    Returns:
        An :class:`ImageSource` with at least one item.

    Raises:
        UserError: missing path, no images, missing column/split, or an unreachable hub dataset.
    """
    if not ref:
        raise UserError("no data source given: set an image folder, a parquet file or a datasets name")
    try:
        source = _open(ref, image_column, split, cache_dir, carry)
    except _ChoiceError as err:
        raise UserError(f"{err}; set {options[err.option]}") from None
    if carry and isinstance(source, FolderSource):
        raise UserError(f"{ref}: an image folder has no columns to carry ({', '.join(carry)})")
    if len(source) == 0:
        raise UserError(f"{ref}: contains no images")
    return source


def _open(ref: str, image_column: str, split: str, cache_dir: str | None,
          carry: Sequence[str] | None) -> ImageSource:
    if is_shard_reference(ref):
        return WebDatasetSource(ref, carry)
    if _GLOB_CHARS & set(ref):
        files = sorted(glob.glob(str(Path(ref).expanduser()), recursive=True))
        if not files:
            raise UserError(f"{ref}: no files match this pattern")
        if not all(f.lower().endswith(".parquet") for f in files):
            raise UserError(f"{ref}: patterns are supported for .parquet files only (pass an image folder instead)")
        source: ImageSource = _parquet_source(files, ref, image_column, cache_dir, carry)
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            source = _open_folder(path, ref, image_column, split, cache_dir, carry)
        elif path.is_file():
            if path.suffix.lower() != ".parquet":
                raise UserError(f"{ref}: not a folder or a .parquet file")
            source = _parquet_source([str(path)], ref, image_column, cache_dir, carry)
        elif _looks_like_path(ref):
            raise UserError(f"{ref}: no such file or folder")
        else:
            source = _open_hub(ref, image_column, split, cache_dir, carry)
    return source


def _open_folder(path: Path, ref: str, column: str, split: str, cache_dir: str | None,
                 carry: Sequence[str] | None = ()) -> ImageSource:
    if any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        datasets = _import_datasets()

        ds = _load_hf(lambda: datasets.load_from_disk(str(path)), ref, "saved dataset")
        return DatasetSource(_pick_split(ds, ref, split), column, ref, "saved dataset", carry)
    source = FolderSource(path)
    if len(source) == 0:
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:  # e.g. a downloaded hub snapshot: data/train-0000x.parquet
            return _parquet_source(parquet, ref, column, cache_dir, carry)
        raise UserError(f"{ref}: no image files found (searched recursively)")
    return source


def _open_hub(name: str, column: str, split: str, cache_dir: str | None,
              carry: Sequence[str] | None = ()) -> ImageSource:
    datasets = _import_datasets()

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise UserError(
            f"{name}: not a local path, and hub dataset {name!r} (split {split!r}) could not be loaded "
            f"({first_line(err, with_type=True)}); offline, pass a local image folder, "
            "save_to_disk folder or parquet file instead") from None
    return DatasetSource(_pick_split(ds, name, split), column, name, "hub dataset", carry)


def _import_datasets():
    """The ``datasets`` module, or a one-line error naming the extra that brings it."""
    from sdvae.errors import require_extra

    require_extra("datasets", "a datasets/parquet source")
    import datasets

    return datasets
