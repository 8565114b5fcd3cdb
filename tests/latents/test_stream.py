"""LatentStream: shards dealt to ranks × DataLoader workers, resumable at a batch count, either layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import encode_small, make_photo
from sdvae.errors import UserError
from sdvae.latents.dataset import LatentDataset
from sdvae.latents.stream import LatentStream, resume_state

ROWS = 13  # 7 shards of 2 rows (the last one 1): workers get different row counts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    for i in range(ROWS):
        Image.fromarray(make_photo(36 + i, 34, seed=i)).save(root / f"{i:02d}.png")
    arrow = root.parent / f"{root.name}-arrow"
    wds = root.parent / f"{root.name}-wds"
    encode_small(root, arrow, shard_size=2, batch_size=4)
    encode_small(root, wds, shard_size=2, batch_size=4, format="webdataset")
    return {"arrow": arrow, "webdataset": wds}


def _batches(stream: LatentStream, batch_size: int, workers: int, drop_last: bool = False) -> list[dict[str, Any]]:
    return list(DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last))


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["index"], y["index"]) and torch.equal(x["latent"], y["latent"])
                                    for x, y in zip(a, b, strict=True))


def test_resume_state_is_the_round_robin_step_by_step() -> None:
    import random

    rng = random.Random(0)
    for _ in range(300):
        rows = [rng.randrange(0, 12) for _ in range(rng.randrange(1, 5))]
        b, drop = rng.randrange(1, 4), rng.random() < 0.3
        counts = [r // b if drop else -(-r // b) for r in rows]
        for batches in range(sum(counts) + 2):
            done, left, last = [0] * len(rows), batches, -1
            while left and any(d < c for d, c in zip(done, counts, strict=True)):  # one round: workers in order
                for w in range(len(rows)):
                    if left and done[w] < counts[w]:
                        done[w], left, last = done[w] + 1, left - 1, w
            consumed, following = resume_state(rows, b, batches, drop)
            assert consumed == [min(d * b, r) for d, r in zip(done, rows, strict=True)]
            if batches < sum(counts):  # which worker serves the next batch
                assert following == (last + 1) % len(rows)


@pytest.mark.parametrize("layout", ["arrow", "webdataset"])
def test_ranks_and_workers_read_every_row_once_as_latent_dataset_serves_it(layouts: dict[str, Path],
                                                                           layout: str) -> None:
    data = LatentDataset(layouts[layout], seed=1)
    seen: list[int] = []
    for rank in (0, 1):
        stream = LatentStream(layouts[layout], rank=rank, world_size=2, batch_size=2, seed=1)
        assert stream.worker_shards(1, 2) == [rank * 2 + 1, rank * 2 + 5][:2 - rank]
        for batch in _batches(stream, 2, 2):
            for j, index in enumerate(batch["index"].tolist()):
                assert torch.equal(batch["latent"][j], data[index]["latent"])  # same draw, same scaling
                assert batch["key"][j] == data[index]["key"]
                seen.append(index)
    assert sorted(seen) == list(range(ROWS))  # disjoint and complete


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
@pytest.mark.parametrize(("layout", "rank", "world", "batch_size", "workers", "drop_last", "cuts"), [
    ("webdataset", 1, 2, 2, 2, False, range(4)),  # workers of 3 and 2 rows: one finishes a batch early
    ("webdataset", 0, 1, 1, 3, False, [0, 1, 4, 8, 10, 11, 12, 13]),  # 5, 4, 4 rows: the last batches from w0 alone
    ("arrow", 0, 1, 2, 3, True, [0, 2, 4, 5]),
    ("arrow", 0, 1, 3, 2, False, [1, 3, 4, 5]),  # 7 and 6 rows: partial batches
])
def test_resume_after_n_batches_continues_the_interrupted_sequence(
        layouts: dict[str, Path], layout: str, rank: int, world: int, batch_size: int, workers: int,
        drop_last: bool, cuts: Any) -> None:
    def stream(skip: int = 0) -> LatentStream:
        return LatentStream(layouts[layout], rank=rank, world_size=world, batch_size=batch_size, skip_batches=skip,
                            drop_last=drop_last, seed=3)

    full = _batches(stream(), batch_size, workers, drop_last)
    assert len(full) >= max(cuts)
    for cut in cuts:
        rest = _batches(stream(cut), batch_size, workers, drop_last)
        assert _same(full[:cut] + rest, full), f"cut {cut}"


def test_rank_from_the_environment_and_older_metadata(layouts: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    stream = LatentStream(layouts["webdataset"])
    assert (stream.rank, stream.world_size) == (1, 3) and stream.worker_shards(0, 1) == [1, 4]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError, match="bad rank 3 for world size 3"):
        LatentStream(layouts["webdataset"])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # An arrow dataset from before shard_files/shard_rows: shards listed, rows counted to resume.
    old = shutil.copytree(layouts["arrow"], tmp_path / "old")
    meta = json.loads((old / "sdvae_latents.json").read_text())
    for key in ("layout", "shard_files", "shard_rows"):
        meta.pop(key, None)
    (old / "sdvae_latents.json").write_text(json.dumps(meta))
    full = _batches(LatentStream(layouts["arrow"], batch_size=2), 2, 0)
    assert _same(full[:3] + _batches(LatentStream(old, batch_size=2, skip_batches=3), 2, 0), full)


@pytest.mark.slow
def test_streams_from_object_storage(layouts: dict[str, Path], s3: str) -> None:
    from sdvae.storage import files
    from sdvae.storage.urls import join

    for layout, folder in layouts.items():
        url = join(s3, layout)
        for path in folder.rglob("*"):
            if path.is_file():
                files.write_bytes(join(url, path.relative_to(folder).as_posix()), path.read_bytes())
        local = _batches(LatentStream(folder, rank=1, world_size=2, batch_size=2), 2, 2)
        assert _same(_batches(LatentStream(url, rank=1, world_size=2, batch_size=2), 2, 2), local)
        resumed = _batches(LatentStream(url, rank=1, world_size=2, batch_size=2, skip_batches=2), 2, 2)
        assert _same(local[:2] + resumed, local)
