"""The inputs of ``sdvae encode-dataset``: work units, and the preprocessed batches of each.

A *work unit* is what is encoded, written, resumed and distributed as one piece:

* an **indexed** source (an image folder, a ``datasets`` dataset; :class:`~sdvae.images.image_source.ImageSource`)
  is cut into units of S consecutive input indices (``--shard-size``); input index = position in the source;
* a **sharded** source (WebDataset tar or parquet shards, local or behind a URL;
  :class:`~sdvae.images.shard_stream.ShardedSource`) has one unit per input shard, read as a stream, so nothing
  is listed or copied up front; input index = ``shard × UNIT_STRIDE + position in the shard``.

Either way a row's random crop and posterior sample are seeded by (seed, input index): the content of a unit is a
pure function of the arguments, whichever process or engine encodes it.

Decoding, resizing and cropping run here, in DataLoader workers (or an engine's CPU tasks), overlapped with the
model. Each batch is ``{"groups": [(pixels, items)], "items": [...], "unit": k, "last": bool, "notes": [...]}``:
``last`` marks the unit's final batch (a unit with no readable image still yields one, empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from sdvae.errors import UserError
from sdvae.images.image_source import ImageSource
from sdvae.images.resize import center_offsets, crop_offsets, resize_shorter
from sdvae.latents.buckets import BucketSet, crop_to_bucket
from sdvae.seeding import seeded_generator

UNIT_STRIDE = 10**9  # sharded sources: input index = shard number × UNIT_STRIDE + position in the shard


def crop_for_encoding(image: torch.Tensor, resolution: int, crop: str, factor: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """Resize and crop one image for encoding.

    Args:
        image: (C,H,W) float32 in [-1,1].
        resolution: shorter side after resizing (bicubic, antialiased; 0: keep the size).
        crop: ``center``/``random``: a resolution×resolution crop; ``none``: keep the whole image except
            for the (< factor) pixels that make a side not a multiple of ``factor``, trimmed evenly.
        factor: the VAE's downsampling factor.
        generator: draws the ``random`` crop offsets.

    Returns:
        (pixels (C,h,w) float32 in [-1,1], resized size [H', W'], crop box [top, left, h, w] in the
        resized image).

    Raises:
        UserError: the image is smaller than one latent cell (``crop none`` only); the message has no
            file name (the caller adds it).
    """
    if resolution:
        image = resize_shorter(image, resolution)
    h, w = image.shape[-2:]
    if crop == "none":
        ch, cw = h - h % factor, w - w % factor
        if not ch or not cw:
            raise UserError(f"image is {w}×{h} pixels, smaller than one latent cell of this model ({factor}×{factor})")
        top, left = center_offsets(h, w, (ch, cw))
    else:
        ch = cw = resolution
        top, left = crop_offsets(h, w, (ch, cw), random=crop == "random", generator=generator)
    pixels = image[:, top:top + ch, left:left + cw].float().contiguous()
    return pixels, [int(h), int(w)], [int(top), int(left), int(ch), int(cw)]


class Preprocess:
    """Decoded image → the item to encode (crop or bucket, sizes, carried values); picklable for workers."""

    def __init__(self, resolution: int, crop: str, factor: int, seed: int, buckets: BucketSet | None = None,
                 channels: int = 3):
        self.resolution, self.crop, self.factor, self.seed = resolution, crop, factor, seed
        self.buckets, self.channels = buckets, channels  # channels: the model's (1, 3 or 4)

    def item(self, index: int, key: str, name: str, load: Any, extras: Any) -> dict[str, Any]:
        """``{"index", "key", "name", "pixels" | "error", sizes, "crop_box", "extras"}`` of one input.

        ``load(channels)`` decodes the image ((C,H,W) float32 in [-1,1]) or raises UserError naming it;
        ``extras()`` gives its carried values. An unreadable or too small input becomes an ``error`` item.
        """
        item: dict[str, Any] = {"index": index, "key": key, "name": name}
        try:
            image = load(self.channels)  # its errors name the input
        except UserError as err:  # unreadable: reported, never fatal
            item["error"] = str(err)
            return item
        generator = seeded_generator(self.seed, "encode-crop", index) if self.crop == "random" else None
        try:
            if self.buckets is not None:
                item["bucket"] = list(self.buckets.assign(*image.shape[-2:]))
                pixels, resized, box = crop_to_bucket(image, item["bucket"], self.crop, generator)
            else:
                pixels, resized, box = crop_for_encoding(image, self.resolution, self.crop, self.factor, generator)
        except UserError as err:  # e.g. smaller than one latent cell: skipped like an unreadable input
            item["error"] = f"{name}: {err}"
            return item
        item.update(pixels=pixels, original_size=[int(s) for s in image.shape[-2:]], resized_size=resized,
                    crop_box=box, extras=extras())
        return item


class IndexedItems(Dataset):
    """Input index of an indexed source → its item (:meth:`Preprocess.item`)."""

    def __init__(self, source: ImageSource, prep: Preprocess):
        self.source, self.prep = source, prep

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        src = self.source
        return self.prep.item(index, src.key(index), src.name(index), lambda c: src.load(index, c),
                              lambda: src.extras(index))


def collate(items: list[dict[str, Any]], unit: int = -1, last: bool = False,
            notes: list[str] | None = None) -> dict[str, Any]:
    """Stack a batch in the worker, one stack per image size (sizes differ only with ``--crop none``).

    Returns:
        ``{"groups": [((b,C,h,w) float32 in [-1,1], [item without pixels] * b), ...], "items": every
        item of the batch (input order), "unit", "last", "notes"}``.
    """
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        if "pixels" in item:
            groups.setdefault(tuple(item["pixels"].shape), []).append(item)
    stacked = [(torch.stack([it.pop("pixels") for it in group]), group) for group in groups.values()]
    return {"groups": stacked, "items": items, "unit": unit, "last": last, "notes": list(notes or [])}


def indexed_batches(units: list[int], num_inputs: int, unit_size: int, batch_size: int) -> list[list[int]]:
    """Index batches of the given units of an indexed source, in order; a batch never straddles two units."""
    out = []
    for k in units:
        indices = list(range(k * unit_size, min((k + 1) * unit_size, num_inputs)))
        out.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    return out


def tag_indexed(batches: Iterator[dict[str, Any]], plan: list[list[int]], unit_size: int,
                num_inputs: int) -> Iterator[dict[str, Any]]:
    """Add ``unit`` and ``last`` to the collated batches of :func:`indexed_batches`'s ``plan`` (same order)."""
    for batch, indices in zip(batches, plan, strict=True):
        k = indices[0] // unit_size
        last = indices[-1] + 1 == min((k + 1) * unit_size, num_inputs)
        batch.update(unit=k, last=last, part=None, final=last, marker_only=False)
        yield batch


def as_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader ``collate_fn`` of :class:`ShardUnits`: its batches come collated (the default would copy
    every nested dict, separating ``groups``' items from ``items``)."""
    return batch


class ShardUnits(IterableDataset):
    """The preprocessed batches of the given input shards of a sharded source; DataLoader worker w of W
    takes units ``units[w::W]``, each whole, so a unit's batches arrive in order from one worker."""

    def __init__(self, source: Any, units: list[int], prep: Preprocess, batch_size: int, part_size: int = 0,
                 done: dict[int, set[int]] | None = None):
        self.source, self.units, self.prep, self.batch_size = source, units, prep, batch_size
        self.part_size, self.done = part_size, done or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.units[info.id::info.num_workers] if info is not None else self.units
        for k in mine:
            yield from unit_batches(self.source, k, self.prep, self.batch_size, self.part_size, self.done.get(k))


def _lookahead(samples: Iterator[Any]) -> Iterator[tuple[int, Any, bool]]:
    """(position, sample, whether it is the last one) of a stream, reading one sample ahead."""
    previous, j = None, -1
    for j, sample in enumerate(samples):
        if j:
            yield j - 1, previous, False
        previous = sample
    if j >= 0:
        yield j, previous, True


def unit_batches(source: Any, k: int, prep: Preprocess, batch_size: int, part_size: int = 0,
                 done_parts: set[int] | None = None) -> Iterator[dict[str, Any]]:
    """Stream input shard ``k`` of a sharded source as collated batches.

    Without ``part_size`` the unit is one piece: its last batch has ``last`` set (an empty shard yields one empty
    batch). With it, samples [p·part_size, (p+1)·part_size) form part p: each batch carries ``part``, a part's
    last batch has ``last`` set and the shard's very last one also ``final``. The samples of ``done_parts`` are
    read past without decoding (a resumed unit); if the final part is among them, one empty batch with
    ``marker_only`` asks for the unit's done marker alone. The notes this shard added (e.g. truncated) travel
    with its last batch.
    """
    seen, shard, done = len(source.notes), source.names[k], done_parts or set()
    pending: list[dict[str, Any]] = []
    part: int | None = 0 if part_size else None
    for j, sample, end in _lookahead(source.samples(k)):
        part = j // part_size if part_size else None
        part_ends = bool(end or (part_size and (j + 1) % part_size == 0))
        notes = source.notes[seen:] if end else None
        if part in done:
            if end:  # the final part's rows were written, its unit's done marker not
                yield _tagged(collate([], k, last=True, notes=notes), part, final=True, marker_only=True)
                return
            continue
        pending.append(_sample_item(source, shard, prep, k * UNIT_STRIDE + j, sample))
        if len(pending) == batch_size or part_ends:
            yield _tagged(collate(pending, k, last=part_ends, notes=notes), part, final=end)
            pending = []
        if end:
            return
    yield _tagged(collate([], k, last=True, notes=source.notes[seen:]), part, final=True)  # an empty shard


def _tagged(batch: dict[str, Any], part: int | None, final: bool, marker_only: bool = False) -> dict[str, Any]:
    batch.update(part=part, final=final and batch["last"], marker_only=marker_only)
    return batch


def _sample_item(source: Any, shard: str, prep: Preprocess, index: int, sample: Any) -> dict[str, Any]:
    name = f"{shard}:{sample.key}.{sample.ext}" if sample.ext else f"{shard}:{sample.key}"
    if sample.error is not None:
        return {"index": index, "key": f"{shard}/{sample.key}", "name": name, "error": sample.error}
    return prep.item(index, f"{shard}/{sample.key}", name, lambda c, s=sample: source.decode(s, c),
                     lambda s=sample: dict(s.extras))
