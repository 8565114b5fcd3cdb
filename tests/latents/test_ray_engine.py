"""encode-dataset --engine ray (sdvae.latents.ray_engine) on a local 2-CPU Ray instance: the same output, file
for file, as one process (image folder, WebDataset tar shards); a killed run resumed; bad input as one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import REPO, dataset_rows, encode_small, jpeg_bytes, save_photo, write_tar
from sdvae.cli.main import main
from sdvae.errors import UserError
from sdvae.latents.format import DATASET_META, read_dataset_meta

pytestmark = pytest.mark.slow

# Random crops and posterior samples: the rows depend on the per-input seeding, whoever encodes them.
OPTS = {"crop": "random", "store": "sample", "shard_size": 2, "batch_size": 2}
CLI_OPTS = ["--model", "test", "--resolution", "32", "--crop", "random", "--store", "sample", "--shard-size", "2",
            "--batch-size", "2", "--dtype", "fp32", "--num-workers", "0", "--no-progress"]


def _all_files(out: Path) -> dict[str, bytes]:
    """Every file of an output (dataset files, shards, side files), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _assert_same_output(out: Path, reference: Path) -> None:
    assert dataset_rows(out) == dataset_rows(reference)
    assert read_dataset_meta(out) == read_dataset_meta(reference)
    files, expected = _all_files(out), _all_files(reference)
    assert sorted(files) == sorted(expected)
    assert [name for name in files if files[name] != expected[name]] == []  # byte for byte


def _assert_summary_like(summary: dict, reference: dict) -> None:
    """run_encode's summary keys, plus the engine's own; the same counts for the whole dataset."""
    assert set(summary) == set(reference) | {"engine", "ray_workers"}, set(summary) ^ set(reference)
    assert summary["engine"] == "ray" and summary["rank"] == 0 and summary["world_size"] == 1
    for key in ("shards_total", "complete", "rows", "skipped", "encoded", "unreadable", "shards_encoded"):
        assert summary[key] == reference[key], key


# --- inputs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 photos of varied sizes and one unreadable file: 8 units of 2."""
    root = tmp_path_factory.mktemp("ray_images")
    for i in range(15):
        save_photo(root / f"im{i:02d}.png", 36 + 3 * (i % 5), 34 + 2 * (i % 4), seed=i)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for a while: on CPUs a batch's latents depend on it in their last
    bits, and each of 2 actors on this 2-CPU instance computes with 1."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def folder_reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One process's output and summary (the default engine), computed with 1 thread as each of 2 actors."""
    out = tmp_path_factory.mktemp("ray_folder_ref") / "out"
    with torch_threads(1):
        return out, encode_small(folder, out, **OPTS)


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three WebDataset shards as img2dataset writes them (jpg + json + txt), one corrupt image in the first."""
    root = tmp_path_factory.mktemp("ray_tars")
    for s, seeds in enumerate([(0, 1, 2), (3, 4), (5, 6, 7)]):
        members = []
        for seed in seeds:
            key = f"{s:05d}{seed:04d}"
            members += [(f"{key}.jpg", jpeg_bytes(seed, 40 + 4 * seed, 36)),
                        (f"{key}.json", json.dumps({"key": key}).encode()), (f"{key}.txt", f"caption {seed}".encode())]
        if s == 0:
            members += [("broken.jpg", b"\xff\xd8 not a jpeg"), ("broken.json", b"{}"), ("broken.txt", b"x")]
        write_tar(root / f"{s:05d}.tar", members)
    return root


# --- the same output as one process -----------------------------------------------------------------


def test_tar_shards_same_files_as_one_process(ray_cluster: str, tars: Path, tmp_path: Path) -> None:
    src = str(tars / "{00000..00002}.tar")
    with torch_threads(2):  # as the one default actor, which has both CPUs
        ref_summary = encode_small(src, tmp_path / "ref", **OPTS)
    summary = encode_small(src, tmp_path / "out", engine="ray", **OPTS)
    assert summary["ray_workers"] == 1  # no GPU: one actor by default
    _assert_summary_like(summary, ref_summary)
    assert summary["shards_total"] == 3 and summary["rows"] == 8 and summary["skipped"] == 1
    rows = dataset_rows(tmp_path / "out")
    assert [r["txt"] for r in rows[:2]] == ["caption 0", "caption 1"]  # carried members
    _assert_same_output(tmp_path / "out", tmp_path / "ref")


def test_nothing_pending_starts_no_actor(ray_cluster: str, tars: Path, tmp_path: Path) -> None:
    src = str(tars / "00001.tar")
    encode_small(src, tmp_path / "ref", **OPTS)
    again = encode_small(src, tmp_path / "ref", engine="ray", **OPTS)  # resumes the 1-process output
    assert again["ray_workers"] == 0 and again["shards_done_before"] == 1 and again["complete"]


# --- kill -9 and rerun ------------------------------------------------------------------------------


def test_folder_killed_run_then_rerun_same_files_as_one_process(
        ray_cluster: str, folder: Path, folder_reference: tuple[Path, dict], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray run (a CLI driver on the shared instance, 2 actors) killed with SIGKILL once its first unit is
    written; Ray ends its actors; a rerun (2 actors) encodes the rest, and one of its actors is killed with
    SIGKILL once it has written a unit (Ray restarts it and retries its unit). Every unit and dataset file is
    then the 1-process run's, byte for byte (this is also the image-folder check of the engine's output)."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_cluster}
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sdvae", "encode-dataset", str(folder), str(out),
                                 *CLI_OPTS, "--engine", "ray", "--ray-workers", "2"], env=env, cwd=REPO,
                                stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 300
        while not list((out / "data").glob("shard-*.arrow")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = list((out / "data").glob("shard-*.arrow"))
    assert written and not (out / DATASET_META).exists(), (tmp_path / "run.log").read_text()[-3000:]
    assert len(written) < 8  # interrupted mid-way

    reference, ref_summary = folder_reference
    killed: list[int] = []
    killer = threading.Thread(target=_kill_an_actor, args=(out, len(written), killed), daemon=True)
    killer.start()
    summary = encode_small(folder, out, engine="ray", ray_workers=2, **OPTS)
    killer.join()
    assert killed, "no actor was killed during the rerun"
    assert summary["ray_workers"] == 2 and summary["shards_done_before"] >= len(written)
    assert summary["shards_done_before"] + summary["shards_encoded"] == 8
    assert set(summary) == set(ref_summary) | {"engine", "ray_workers"}, set(summary) ^ set(ref_summary)
    assert summary["complete"] and (summary["rows"], summary["skipped"]) == (15, 1)
    _assert_same_output(out, reference)


def _kill_an_actor(out: Path, before: int, killed: list[int]) -> None:
    """SIGKILL one encoder actor (a process under this one: the session's Ray instance) as soon as more than
    ``before`` units are written in ``out``; its pid goes into ``killed``."""
    psutil = pytest.importorskip("psutil")
    deadline = time.time() + 300
    while len(list((out / "data").glob("shard-*.arrow"))) <= before and time.time() < deadline:
        time.sleep(0.005)
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "_UnitEncoder" in " ".join(proc.cmdline()):
                proc.kill()
                killed.append(proc.pid)
                return


# --- bad input: one line ----------------------------------------------------------------------------


def _cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in this process; its exit status must be 2 and stderr one line, which is returned."""
    capsys.readouterr()
    assert main(["encode-dataset", *args, *CLI_OPTS, "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_missing_shard_and_bad_model_are_one_line(ray_cluster: str, tars: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(capsys, str(tars / "{00000..00003}.tar"), str(tmp_path / "a"))
    assert "00003.tar" in err and "no such" in err
    args = [str(tars / "00000.tar"), str(tmp_path / "b"), *CLI_OPTS, "--engine", "ray", "--model", "no/such-model"]
    capsys.readouterr()
    assert main(["encode-dataset", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no/such-model" in err, err


def test_shard_lost_after_start_is_one_line_from_the_worker(ray_cluster: str, tars: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard that disappears once the driver has checked the source: the actors meet it (their own
    prepare_job), and their UserError reaches the caller as the same one line, not a Ray traceback."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (src / name).write_bytes((tars / name).read_bytes())
    from sdvae.latents.encode_job import Job

    listed = Job.done_units

    def then_lose_a_shard(self: Job) -> set[int]:
        done = listed(self)
        (src / "00001.tar").unlink()
        return done

    monkeypatch.setattr(Job, "done_units", then_lose_a_shard)
    with pytest.raises(UserError) as caught:
        encode_small(str(src / "{00000..00001}.tar"), tmp_path / "out", engine="ray", **OPTS)
    message = str(caught.value)
    assert "00001.tar" in message and "no such" in message and "\n" not in message, message


def test_missing_ray_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(UserError, match=r"^--engine ray needs Ray: pip install 'sdvae\[ray\]'$"):
        encode_small(tmp_path, tmp_path / "out", engine="ray")
