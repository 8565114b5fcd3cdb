"""`log.with: wandb` end to end: tools/train.py in wandb's offline mode, then its run file read back.

The offline run is ``OUT/wandb/offline-run-*/run-ID.wandb`` (``start_trackers`` passes ``dir=train.out``):
wandb's transaction log, LevelDB's log format (32 KiB blocks of CRC32-checked chunks) around
``wandb.proto.wandb_internal_pb2.Record`` messages, which is what ``wandb sync`` would upload. wandb ships
no Python reader of it any more, so :func:`_records` is one; the logged media are files beside it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, save_photo

pytestmark = pytest.mark.slow
TRAIN = str(REPO / "tools" / "train.py")
CONFIG = str(REPO / "configs" / "test.yaml")
BLOCK, HEADER = 32768, b":W&B\xe1\xbe\x00"  # the log's block size; ident ":W&B", magic 0xBEE1 (LE), version 0
FULL, LAST = 1, 4  # chunk types that end a record (FIRST=2 and MIDDLE=3 continue one)


def _records(path: Path) -> Iterator[object]:
    """The ``Record`` messages of a ``.wandb`` file, in order (each chunk's CRC checked)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:len(HEADER)] == HEADER, f"{path}: not a wandb transaction log ({data[:7]!r})"
    pos, parts = len(HEADER), []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        parts.append(chunk)
        pos += 7 + length
        if kind in (FULL, LAST):
            yield wandb_internal_pb2.Record.FromString(b"".join(parts))
            parts = []
    assert not parts, f"{path}: ends inside a record"


def _items(items) -> dict[str, object]:
    """History/summary/config items as {"a/b": value} (nested keys joined with '.')."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_has_losses_and_sample_grid(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    images = tmp_path / "images"
    for i in range(8):
        save_photo(images / f"{i}.png", 40 + i % 3, 36, seed=i)
    out = tmp_path / "run"
    # Hermetic: none of the developer's WANDB_* settings (online mode, entity, run id), nothing under ~.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    home = str(tmp_path / "wandb-home")
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_CONFIG_DIR": home, "WANDB_DATA_DIR": home}
    proc = subprocess.run([sys.executable, TRAIN, CONFIG, f"--data.train={images}", f"--train.out={out}",
                           "--log.with=wandb", "--train.steps=10", "--log.every=5", "--train.val_every=5",
                           "--train.checkpoint_every=10"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "tensorboard").exists()  # log.with=wandb only

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {out / 'wandb'}: {runs}"
    (log,) = runs[0].glob("run-*.wandb")
    records = list(_records(log))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r, k in zip(records, kinds, strict=True) if k == "run"]
    assert run.project == "sdvae" and run.display_name == out.name  # log.project; the run folder's name
    config = {}
    for r, k in zip(records, kinds, strict=True):
        if k == "config":
            config |= _items(r.config.update)
    assert config["train.steps"] == 10 and config["log.with"] == "wandb"
    (exit_record,) = [r.exit for r, k in zip(records, kinds, strict=True) if k == "exit"]
    assert exit_record.exit_code == 0  # accelerator.end_training() finished the run

    history = {}  # step -> that step's logged values (accelerate logs scalars and images in separate calls)
    for r, k in zip(records, kinds, strict=True):
        if k == "history":
            history.setdefault(r.history.step.num, {}).update(_items(r.history.item))
    assert sorted(history) == [5, 10]
    for step in (5, 10):
        logged = history[step]
        for key in ("train/loss", "train/rec", "train/kl", "train/grad_norm", "train/lr", "val/psnr", "val/ssim"):
            assert isinstance(logged.get(key), float) and math.isfinite(logged[key]), (step, key, logged.get(key))
        assert logged["train/lr"] == pytest.approx(1e-3)

        # The sample grid: one PNG per validation, the same picture as OUT/samples/step-N.png.
        assert logged["val/original|reconstruction._type"] == "images/separated"
        (name,) = logged["val/original|reconstruction.filenames"]
        png = runs[0] / "files" / name
        assert png.is_file(), f"{png} missing; files/: {sorted(p.name for p in (runs[0] / 'files').rglob('*'))}"
        grid = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
        saved = np.asarray(Image.open(out / "samples" / f"step-{step:08d}.png").convert("RGB"), dtype=np.int16)
        assert grid.shape == saved.shape == (logged["val/original|reconstruction.height"],
                                             logged["val/original|reconstruction.width"], 3)
        assert np.abs(grid - saved).max() <= 1  # (3,H,W) -> HWC uint8, not transposed or channel-swapped
