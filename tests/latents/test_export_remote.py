"""encode-dataset with an object store as SRC and OUT (a local S3-compatible server, tests/conftest.py ``s3``):
the same rows as a local run, from 1 process or 2 ranks, and after a kill -9 and a rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from crash_hook import Launcher
from helpers import REPO, encode_small, jpeg_bytes, write_tar
from sdvae.errors import UserError

pytestmark = pytest.mark.slow


def _shards(root: Path, sizes: tuple[int, ...] = (3, 2, 4)) -> Path:
    """Tar shards 00000.tar … of jpg + json + txt samples (one corrupt image in the first)."""
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    for s, n in enumerate(sizes):
        members = []
        for _ in range(n):
            key = f"{s:05d}{seed:04d}"
            members += [(f"{key}.jpg", jpeg_bytes(seed, 40 + seed % 3, 36)),
                        (f"{key}.json", json.dumps({"seed": seed}).encode()), (f"{key}.txt", f"photo {seed}".encode())]
            seed += 1
        if s == 0:
            members.append(("bad.jpg", b"\xff\xd8 not a jpeg"))
        write_tar(root / f"{s:05d}.tar", members)
    return root


def _upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(local.iterdir()):
        fs.pipe_file(f"{url.removeprefix('s3://')}/{path.name}", path.read_bytes())


def _tree(url_or_path: str) -> dict[str, bytes]:
    """Every file of an output (relative name → bytes), local or on S3."""
    if url_or_path.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)  # no listing cached from an earlier look
        root = url_or_path.removeprefix("s3://")
        return {p.removeprefix(root + "/"): fs.cat_file(p) for p in sorted(fs.find(root))}
    root = Path(url_or_path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def remote_shards(s3: str, tmp_path: Path) -> tuple[Path, str]:
    local = _shards(tmp_path / "shards")
    _upload(local, f"{s3}/in")
    return local, f"{s3}/in"


def test_bucket_to_bucket_equals_local_run(remote_shards: tuple[Path, str], s3: str, tmp_path: Path) -> None:
    local, remote = remote_shards
    here = encode_small(str(local / "{00000..00002}.tar"), tmp_path / "local")
    there = encode_small(remote + "/{00000..00002}.tar", f"{s3}/out")  # type: ignore[arg-type]
    assert here["complete"] and there["complete"] and there["rows"] == here["rows"] == 9
    assert there["skipped"] == 1 and there["out"] == f"{s3}/out"
    a, b = _tree(str(tmp_path / "local")), _tree(f"{s3}/out")
    # The same files with the same bytes, except where the source's location is written down.
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == ["dataset_info.json", "sdvae_encode_args.json", "sdvae_latents.json", "state.json"]
    for name in different:
        old, new = json.loads(a[name]), json.loads(b[name])
        if name == "dataset_info.json":
            old, new = json.loads(old["description"]), json.loads(new["description"])
        changed = {k for k in old if old[k] != new[k]}
        expected = {"state.json": {"_fingerprint"}, "sdvae_encode_args.json": {"src"}}.get(name, {"src", "source"})
        assert changed == expected, (name, changed)  # "source": the description, which names the location
    assert b["skipped.txt"].decode().startswith("00000.tar:bad.jpg\t")


def test_two_ranks_on_a_bucket_equal_one_process(remote_shards: tuple[Path, str], s3: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, remote = remote_shards
    src = remote + "/*.tar"
    encode_small(src, f"{s3}/one")  # type: ignore[arg-type]
    for rank in (1, 0):  # rank 1 first: rank 0 then finds every shard and completes the dataset
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        summary = encode_small(src, f"{s3}/two")  # type: ignore[arg-type]
        assert summary["complete"] == (rank == 0)
    assert _tree(f"{s3}/one") == _tree(f"{s3}/two")


def test_killed_bucket_run_in_webdataset_format_resumes_to_the_same_objects(remote_shards: tuple[Path, str], s3: str,
                                                        tmp_path: Path) -> None:
    _, remote = remote_shards
    src = remote + "/{00000..00002}.tar"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDVAE_TEST_")}

    def args(out: str) -> list[str]:
        return ["-m", "sdvae.cli", "encode-dataset", src, out, "--model", "test", "--resolution", "32",
                "--batch-size", "3", "--dtype", "fp32", "--num-workers", "1", "--format", "webdataset", "--no-progress"]

    with Launcher(env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, REPO) as launcher:
        assert launcher.run(args(f"{s3}/ref"), tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()
        assert launcher.run(args(f"{s3}/out"), tmp_path / "kill.log", {"SDVAE_TEST_KILL": "shard:2"}) == -9
        partial = _tree(f"{s3}/out")
        assert "sdvae_latents.json" not in partial and "data/shard-00000.tar" in partial
        assert "data/shard-00001.tar" not in partial
        assert launcher.run(args(f"{s3}/out"), tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()
    assert _tree(f"{s3}/out") == _tree(f"{s3}/ref")


def test_missing_shard_and_unreachable_endpoint_are_one_line(remote_shards: tuple[Path, str], s3: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"in/00003\.tar: no such tar shard \(1 of 4 missing\)$") as err:
        encode_small(f"{s3}/in/{{00000..00003}}.tar", tmp_path / "out")
    assert "\n" not in str(err.value)
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError) as err:
        encode_small(f"{s3}/in/00000.tar", tmp_path / "out2")
    assert "\n" not in str(err.value) and "127.0.0.1:9" in str(err.value) and "testing" not in str(err.value)


def test_ray_engine_on_a_bucket_equals_one_process(remote_shards: tuple[Path, str], s3: str, tmp_path: Path) -> None:
    """``--engine ray`` with SRC and OUT in the bucket: a driver starting its own local Ray instance (which
    inherits the environment, endpoint and credentials included), the same objects as 1 process. Both run torch
    on one thread per CPU (the one actor takes all of the instance's CPUs): on CPUs the last bits depend on the
    thread count."""
    import subprocess
    import sys

    _, remote = remote_shards
    src = remote + "/*.tar"
    common = ["--model", "test", "--resolution", "32", "--batch-size", "3", "--dtype", "fp32", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
    engines = {"one": ["--num-workers", "0"], "ray": ["--engine", "ray", "--ray-workers", "1"]}
    for out, engine in ((f"{s3}/{name}", flags) for name, flags in engines.items()):
        run = subprocess.run([sys.executable, "-m", "sdvae.cli", "encode-dataset", src, out, *common, *engine],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "complete: 9 rows" in run.stdout and "1 Ray worker(s)" in run.stdout
    assert _tree(f"{s3}/ray") == _tree(f"{s3}/one")


def test_a_prefix_with_other_objects_is_refused_but_not_a_rank_that_started_first(
        remote_shards: tuple[Path, str], s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from sdvae.latents import format as fmt

    _, remote = remote_shards
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{s3.removeprefix('s3://')}/taken/notes.txt", b"someone else's")
    with pytest.raises(UserError, match=r"taken: holds objects and is not an encode-dataset output"):
        encode_small(remote + "/*.tar", f"{s3}/taken")  # type: ignore[arg-type]
    # Two ranks starting together: the other one wrote the (identical) arguments between our look and our listing.
    encode_small(remote + "/*.tar", f"{s3}/first")  # type: ignore[arg-type]
    args = fs.cat_file(f"{s3.removeprefix('s3://')}/first/{fmt.ENCODE_ARGS}")
    fs.pipe_file(f"{s3.removeprefix('s3://')}/race/{fmt.ENCODE_ARGS}", args)
    real = fmt.files.exists
    monkeypatch.setattr(fmt.files, "exists", lambda ref: False if ref.endswith(fmt.ENCODE_ARGS) else real(ref))
    assert encode_small(remote + "/*.tar", f"{s3}/race")["complete"]  # type: ignore[arg-type]
