"""sdvae.progress: plain progress lines at a bounded rate when stderr is not a terminal."""

from __future__ import annotations

import io
from pathlib import Path

from helpers import encode_small
from sdvae.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_5_percent_and_at_the_end() -> None:
    stream, clock = io.StringIO(), Clock()
    with Progress(1000, "encode", stream=stream, clock=clock) as bar:
        for _ in range(1000):
            clock.now += 0.01
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20  # 5%, 10%, ... 95%, then the final line
    assert lines[0].startswith("encode: 50/1,000 img (5%), 100.0 img/s, ETA ")
    assert lines[-1] == "encode: 1,000/1,000 img (100%), 100.0 img/s, done in 10s"


def test_plain_lines_every_30_seconds_when_slow_or_total_unknown() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress(None, "eval", stream=stream, clock=clock)
    for _ in range(10):
        clock.now += 10
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 + 1 and lines[0].startswith("eval: 3 img, ")  # at 30, 60, 90 s and the end


def test_disabled_reports_nothing() -> None:
    stream = io.StringIO()
    with Progress(10, "x", enabled=False, stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


def test_encode_dataset_reports_progress_in_logs(images: Path, tmp_path: Path, capsys) -> None:
    encode_small(images, tmp_path / "out", progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal: plain lines, not a vanished bar
    assert "encode: 12/12 img (100%)" in err and "done in" in err
