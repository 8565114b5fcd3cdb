"""Disk errors (ENOSPC, EROFS) during the CLI's writes: one line, exit ≠ 0, no partial file, a rerun succeeds.

The faults are simulated in-process by making ``os.replace`` (the atomic rename), PIL's ``save`` or a
config write fail the way a full or read-only disk makes them fail.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from helpers import encode_small, save_photo
from sdvae.atomic import atomic_dir, atomic_file
from sdvae.cli.main import main
from sdvae.errors import UserError, WriteError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))


def _failing_replace(err: OSError, when=lambda src, dst: True, times: int = 1_000_000):
    """``os.replace`` failing with ``err`` for renames ``when`` picks (the first ``times`` of them)."""
    real, left = os.replace, [times]

    def replace(src, dst, *args, **kwargs):
        if left[0] > 0 and when(Path(src), Path(dst)):
            left[0] -= 1
            raise err
        return real(src, dst, *args, **kwargs)

    return replace


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line_error(capsys: pytest.CaptureFixture, code: int, expected: int = 2) -> str:
    """The error line (the last on stderr; notes such as skipped inputs may come before it)."""
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == expected and lines and lines[-1].startswith("sdvae: error: "), (code, out, err)
    assert sum(line.startswith("sdvae: error") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("fault", [ENOSPC, EROFS], ids=["ENOSPC", "EROFS"])
def test_atomic_file_maps_the_error_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      fault: OSError) -> None:
    dest = tmp_path / "config.json"
    dest.write_text("old")
    monkeypatch.setattr(os, "replace", _failing_replace(fault))
    with pytest.raises(WriteError) as err, atomic_file(dest) as tmp:
        tmp.write_text(json.dumps({"new": 1}))
    assert str(err.value) == f"{dest}: cannot write ({fault.strerror})" and err.value.errno == fault.errno
    assert isinstance(err.value, UserError) and isinstance(err.value, OSError)
    assert _files(tmp_path) == {"config.json"} and dest.read_text() == "old"
    monkeypatch.undo()
    with atomic_file(dest) as tmp:  # the fault removed: the rerun writes
        tmp.write_text("new")
    assert dest.read_text() == "new" and _files(tmp_path) == {"config.json"}


def test_an_oserror_while_writing_the_temp_file_is_a_write_error(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="cannot write"), atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("partial")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert _files(tmp_path) == set()


def test_atomic_dir_restores_the_previous_folder_when_the_final_rename_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    # The first rename (old folder aside) works, the second (new folder into place) fails once.
    monkeypatch.setattr(os, "replace", _failing_replace(ENOSPC, when=lambda src, dst: dst == dest, times=1))
    with pytest.raises(WriteError, match="No space left"), atomic_dir(dest) as tmp:
        (tmp / "new").write_text("new")
    assert _files(tmp_path) == {"model", "model/config.json"} and (dest / "config.json").read_text() == "old"


def test_convert_config_write_fails_nothing_written_then_rerun(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while writing config.json of `sdvae convert --to diffusers`; then with --force over an old output."""
    from diffusers import AutoencoderKL

    def full_disk(self, *args, **kwargs):
        raise ENOSPC

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(AutoencoderKL, "save_config", full_disk)
        err = _one_line_error(capsys, main(["convert", "test", str(out), "--to", "diffusers"]))
    assert f"{out}: cannot write (No space left on device)" in err and _files(tmp_path) == set()
    assert main(["convert", "test", str(out), "--to", "diffusers"]) == 0
    before = {p: (out / p).read_bytes() for p in _files(out)}
    # --force over it, and the final rename fails: the previous output is still there, unchanged.
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _failing_replace(EROFS, when=lambda src, dst: dst == out, times=1))
        capsys.readouterr()
        err = _one_line_error(capsys, main(["convert", "tiny", str(out), "--to", "diffusers", "--force"]))
    assert "Read-only file system" in err
    assert _files(tmp_path) == {"out", *(f"out/{p}" for p in before)}
    assert {p: (out / p).read_bytes() for p in _files(out)} == before


def test_roundtrip_image_write_fails_then_rerun(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    photo = tmp_path / "photo.png"
    save_photo(photo, 40, 32, seed=0)
    argv = ["roundtrip", str(photo), "--model", "test", "--dtype", "fp32", "-o", str(tmp_path / "recon.png")]

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")  # some bytes reach the temporary file before the disk fills
        raise ENOSPC

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", full_disk)
        err = _one_line_error(capsys, main(argv))
    assert "recon.png: cannot write (No space left on device)" in err and _files(tmp_path) == {"photo.png"}
    assert main(argv) == 0
    assert _files(tmp_path) == {"photo.png", "recon.png", "recon.compare.png"}


def test_latent_shard_write_fails_then_rerun_completes(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the second shard's rename: one line, no partial shard; the rerun resumes and completes."""
    out = tmp_path / "latents"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _failing_replace(ENOSPC, when=lambda src, dst: dst.name == "shard-00001.arrow"))
        with pytest.raises(WriteError, match=r"shard-00001\.arrow: cannot write \(No space left on device\)"):
            encode_small(images, out)
    assert not any(".tmp" in p for p in _files(out)) and not (out / "data" / "shard-00001.arrow").exists()
    done_before = sorted(p.name for p in (out / "data").glob("shard-*.arrow"))
    summary = encode_small(images, out)
    assert summary["complete"] and summary["rows"] == 10
    assert summary["shards_done_before"] == len(done_before) >= 1


def test_encode_dataset_command_reports_the_shard_write_in_one_line(images: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "replace", _failing_replace(EROFS, when=lambda src, dst: dst.suffix == ".arrow"))
    code = main(["encode-dataset", str(images), str(tmp_path / "latents"), "--model", "test", "--resolution", "32",
                 "--dtype", "fp32", "--shard-size", "4", "--num-workers", "0", "--no-progress"])
    err = _one_line_error(capsys, code)
    assert "shard-0000" in err and "Read-only file system" in err


def test_other_oserrors_are_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import sdvae.model.load

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "model.safetensors"))

    monkeypatch.setattr(sdvae.model.load, "load_vae", broken)
    err = _one_line_error(capsys, main(["info", "test"]), expected=1)
    assert "model.safetensors" in err and "Input/output error" in err


def test_encode_waits_for_in_flight_shard_writes_before_raising(images: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0's write fails at once while shard 1's is still running: the error waits for shard 1."""
    import time

    import sdvae.latents.encode_job as job

    real, finished = job.write_finished_unit, []

    def write(out, piece, *args, **kwargs):  # piece: (unit, part)
        if piece[0] == 0:
            raise ENOSPC
        time.sleep(0.5)
        real(out, piece, *args, **kwargs)
        finished.append(piece[0])

    monkeypatch.setattr(job, "write_finished_unit", write)
    with pytest.raises(OSError, match="No space left"):
        encode_small(images, tmp_path / "latents", shard_size=8)
    assert finished == [1] and (tmp_path / "latents" / "data" / "shard-00001.arrow").is_file()


def test_atomic_dir_says_where_the_previous_folder_is_if_it_cannot_be_put_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    monkeypatch.setattr(os, "replace", _failing_replace(EROFS, when=lambda src, dst: dst == dest))
    with pytest.raises(WriteError) as err, atomic_dir(dest) as tmp:
        (tmp / "new").write_text("new")
    aside = [p for p in tmp_path.iterdir() if p.name != "model"]
    assert len(aside) == 1 and (aside[0] / "config.json").read_text() == "old"
    assert str(err.value) == f"{dest}: cannot write (Read-only file system); its previous content is kept in {aside[0]}"
