"""sdvae.storage: refs as strings (urls), file I/O on local paths and S3 (files), one-line errors (errors)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sdvae.atomic import write_json as atomic_write_json
from sdvae.errors import UserError
from sdvae.storage import files, urls


def test_urls_redact_join_and_split() -> None:
    assert not urls.is_url("data/x.tar") and not urls.is_url("file:///data/x.tar") and urls.is_url("s3://b/x")
    assert urls.is_url("simplecache::s3://b/x") and urls.scheme("GS://b") == "gs"
    assert urls.redact("s3://AKIA:se/cr+et@bucket/x.tar?X-Amz-Signature=abc") == "s3://bucket/x.tar"
    assert urls.redact("https://user:pw@host:8080/a/b.tar?token=t") == "https://host:8080/a/b.tar"
    assert urls.redact("https://host:8080/a@b/c.tar") == "https://host:8080/a@b/c.tar"  # a port is not a secret
    assert urls.redact("hf://datasets/org/name@main/x.parquet") == "hf://datasets/org/name@main/x.parquet"
    assert urls.redact("data/a@b?.tar") == "data/a@b?.tar"  # local paths are shown as they are
    assert urls.join("s3://b/", "/out/", "x.json") == "s3://b/out/x.json" == urls.join("s3://b", "out", "x.json")
    assert urls.join("out", "x.json") == os.path.join("out", "x.json")
    assert urls.parent("s3://b/d/x.tar?v=1") == "s3://b/d" and urls.basename("s3://b/d/x.tar?v=1") == "x.tar"


def test_local_writes_are_atomic_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "new" / "sub" / "x.bin"
    files.write_bytes(str(dest), b"first")  # parent folders created
    assert files.read_bytes(str(dest)) == b"first" and files.exists(f"file://{dest}")
    files.write_json(str(tmp_path / "new" / "a.json"), {"a": [1, 2]})
    atomic_write_json(tmp_path / "ref.json", {"a": [1, 2]})
    assert (tmp_path / "new" / "a.json").read_text() == (tmp_path / "ref.json").read_text()
    assert files.read_json(str(tmp_path / "new" / "a.json")) == {"a": [1, 2]}
    assert files.list_files(str(tmp_path / "new")) == {"a.json": (tmp_path / "ref.json").stat().st_size}
    assert files.list_files(str(tmp_path / "absent")) == {}

    def refuse(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)  # the rename fails: the old content stays whole
    with pytest.raises(UserError, match=r"x\.bin: cannot write"):
        files.write_bytes(str(dest), b"second, longer content")
    monkeypatch.undo()
    assert dest.read_bytes() == b"first" and sorted(p.name for p in dest.parent.iterdir()) == ["x.bin"]
    files.remove(str(dest))
    files.remove(str(dest))  # missing is fine
    assert not dest.exists()
    with pytest.raises(UserError, match=r"x\.bin: no such file$"):
        files.read_bytes(str(dest))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON"):
        files.read_json(str(tmp_path / "bad.json"))


def test_expand_local_range_glob_and_list(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.tar").write_bytes(b"y")
    names = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert files.expand(str(tmp_path / "{00000..00002}.tar")) == names
    assert files.expand(str(tmp_path / "*.tar")) == names  # sorted, folders' files not included
    (tmp_path / "list.txt").write_text(f"# shards\n\n00002.tar\nsub/other.tar\n{tmp_path / '00000.tar'}\n")
    assert files.expand(str(tmp_path / "list.txt")) == [names[2], str(tmp_path / "sub" / "other.tar"), names[0]]
    with pytest.raises(UserError, match=r"00003\.tar: no such tar shard \(2 of 5 missing\)"):
        files.expand(str(tmp_path / "{00000..00004}.tar"), what="tar shard")
    with pytest.raises(UserError, match=r"\*\.parquet: no files match this pattern"):
        files.expand(str(tmp_path / "*.parquet"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match=r"empty\.txt: the list names no file"):
        files.expand(str(tmp_path / "empty.txt"))


def test_a_missing_protocol_package_names_what_to_install() -> None:
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"^gs://b/x: reading gs:// needs gcsfs: pip install gcsfs$"):
            files.read_bytes("gs://b/x")
    with pytest.raises(UserError, match=r"^nope://b/x: unknown protocol nope://"):
        files.exists("nope://b/x")


def test_missing_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    registry = sys.modules["fsspec.registry"]._registry  # protocol -> class, once a protocol was used

    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs -> ImportError, as without the extra
    for protocol in ("s3", "s3a"):
        if protocol in registry:
            monkeypatch.delitem(registry, protocol)
    with pytest.raises(UserError, match=r"^s3://b/x: reading s3:// needs s3fs: pip install 'sdvae\[remote\]'$"):
        files.read_bytes("s3://b/x")


@pytest.mark.slow
def test_s3_roundtrip_with_single_put_writes(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    calls: list[str] = []
    original = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(method)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    ref = urls.join(s3, "out", "data.bin")
    payload = os.urandom(300_000)
    files.write_bytes(ref, payload)
    assert [c for c in calls if "put" in c.lower() or "multipart" in c.lower()] == ["put_object"]
    assert files.read_bytes(ref) == payload and files.exists(ref) and not files.exists(ref + ".nope")
    with files.open_read(ref) as f:
        assert f.read(10) == payload[:10] and f.read() == payload[10:]
    files.write_json(urls.join(s3, "out", "meta.json"), {"rows": 3})
    assert files.read_json(urls.join(s3, "out", "meta.json")) == {"rows": 3}
    assert files.list_files(urls.join(s3, "out")) == {"data.bin": len(payload), "meta.json": len('{\n  "rows": 3\n}\n')}
    assert files.list_files(urls.join(s3, "absent")) == {}
    files.remove(ref)
    files.remove(ref)
    assert not files.exists(ref) and list(files.list_files(urls.join(s3, "out"))) == ["meta.json"]


@pytest.mark.slow
def test_s3_expand_range_glob_and_list(s3: str) -> None:
    names = [urls.join(s3, "d", f"{i:05d}.tar") for i in range(12)]  # > 8: checked with one listing
    for name in names:
        files.write_bytes(name, b"x")
    assert files.expand(urls.join(s3, "d", "{00000..00011}.tar")) == names
    assert files.expand(urls.join(s3, "d", "0000?.tar")) == names[:10]
    files.write_bytes(urls.join(s3, "lists", "shards.txt"), f"../d/00003.tar\n# c\n{names[5]}\n".encode())
    files.write_bytes(urls.join(s3, "shards.txt"), b"d/00003.tar\nd/00004.tar\n")
    assert files.expand(urls.join(s3, "shards.txt")) == names[3:5]
    with pytest.raises(UserError, match=r"^s3://test-\w+/d/00012\.tar: no such file \(3 of 15 missing\)$"):
        files.expand(urls.join(s3, "d", "{00000..00014}.tar"))
    with pytest.raises(UserError, match=r"d/00012\.tar: no such file \(2 of 4 missing\)$"):
        files.expand(urls.join(s3, "d", "{00010..00013}.tar"))  # few: checked one by one
    with pytest.raises(UserError, match=r"d/\*\.parquet: no files match this pattern"):
        files.expand(urls.join(s3, "d", "*.parquet"))


@pytest.mark.slow
def test_s3_failures_are_one_line_without_secrets(s3: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests
    import s3fs

    files.write_bytes(urls.join(s3, "x.bin"), b"x")
    with pytest.raises(UserError, match=r"^s3://test-\w+/missing\.bin: no such file$"):
        files.read_bytes(urls.join(s3, "missing.bin"))
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-here/x\.bin: no such bucket$"):
        files.read_bytes("s3://no-such-bucket-here/x.bin")
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-here/x\.bin: no such file$"):
        files.expand("s3://no-such-bucket-here/x.bin")

    secret = "sekrit/Value+1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0")  # moto checks keys from now on
    try:
        with pytest.raises(UserError) as err:
            files.read_bytes(urls.join(s3, "x.bin"))
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf")
    assert str(err.value) == f"{s3}/x.bin: access denied (check the credentials in the environment)"
    assert "sekrit" not in str(err.value)

    with pytest.raises(UserError, match=r"^s3://b/x\.bin: ") as err:
        files.read_bytes(f"s3://AKIA:{secret}@b/x.bin")  # a key in the URL is never shown
    assert "sekrit" not in str(err.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError, match=r"^s3://test-\w+/x\.bin: no credentials found \(set AWS_ACCESS_KEY_ID"):
        files.read_bytes(urls.join(s3, "x.bin"))


@pytest.mark.slow
def test_an_unreachable_endpoint_fails_fast_with_one_line(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import s3fs

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore retries connection errors (with backoff) by default
    s3fs.S3FileSystem.clear_instance_cache()
    start = time.monotonic()
    for call in (lambda: files.read_bytes(urls.join(s3, "x.bin")), lambda: files.list_files(s3),
                 lambda: files.write_json(urls.join(s3, "a.json"), {}), lambda: files.expand(urls.join(s3, "*.tar"))):
        with pytest.raises(UserError, match=rf"^s3://test-\w+.*: cannot reach http://127\.0\.0\.1:{port}: "):
            call()
    assert time.monotonic() - start < 5
