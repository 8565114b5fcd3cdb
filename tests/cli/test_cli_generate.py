"""sdvae interpolate: --size and the labelled strip (in-process, the `test` preset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, make_photo
from sdvae.cli.main import main


def _rows_only(side: int, padding: int = 2) -> int:
    """Height of labelled_rows' two rows of ``side``-pixel images, without the column labels."""
    return 2 * (side + padding) + padding


def test_interpolate_size_and_step_labels(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(make_photo(48, 32, seed=0)).save(a)
    Image.fromarray(make_photo(40, 40, seed=1)).save(b)
    small, full = tmp_path / "small.png", tmp_path / "full.png"
    common = ["interpolate", str(a), str(b), "--model", "test", "-n", "3", "--device", "cpu"]
    assert main([*common, "--size", "16", "-o", str(small)]) == 0
    captured = capsys.readouterr()
    assert "a.png resized from 48x32 to 24x16 (--size 16" in captured.err
    assert "b.png resized from 40x40 to cover 24x16" in captured.err and "24x16" in captured.out
    assert main([*common, "--size", "0", "-o", str(full)]) == 0
    assert "a.png resized" not in capsys.readouterr().err
    with Image.open(small) as s, Image.open(full) as f:
        small_img, full_img = np.asarray(s.convert("RGB")), np.asarray(f.convert("RGB"))
    # Rows follow --size (16 vs 32 pixels high); above them, a band of column labels of one height.
    band = small_img.shape[0] - _rows_only(16)
    assert band > 0 and full_img.shape[0] - _rows_only(32) == band
    assert full_img.shape[1] > small_img.shape[1]
    # The band holds dark text (the row labels are beside the rows, not in it), up to the last column.
    dark_columns = (small_img[:band].min(axis=2) < 128).any(axis=0)
    width = small_img.shape[1]
    assert dark_columns[: width // 2].any() and dark_columns[3 * width // 4:].any()


def test_interpolate_labels_are_the_t_values(tmp_path: Path, monkeypatch) -> None:
    import sdvae.images.compose as compose

    seen = {}
    real = compose.labelled_rows

    def spy(rows, padding=2, column_labels=None):
        rows = list(rows)
        seen.update(rows=[label for label, _ in rows], columns=column_labels)
        return real(rows, padding, column_labels)

    monkeypatch.setattr(compose, "labelled_rows", spy)
    a = tmp_path / "a.png"
    Image.fromarray(make_photo(16, 16, seed=0)).save(a)
    assert main(["interpolate", str(a), str(a), "--model", "test", "-n", "4", "-o", str(tmp_path / "s.png")]) == 0
    assert seen == {"rows": ["linear", "spherical"], "columns": ["t=0.00", "t=0.33", "t=0.67", "t=1.00"]}


def test_interpolate_size_default_documented(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["interpolate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--size" in text and "default 256; 0: full resolution" in text
    page = " ".join((REPO / "docs" / "evaluation-and-theory.md").read_text().split())
    assert "`--size` pixels (default 256, never enlarged; 0: full resolution)" in page and "`t=0.00`" in page


def test_interpolate_rejects_a_size_below_one_latent_cell(tmp_path: Path, capsys) -> None:
    a = tmp_path / "a.png"
    Image.fromarray(make_photo(16, 16, seed=0)).save(a)
    assert main(["interpolate", str(a), str(a), "--model", "test", "--size", "4", "-o", str(tmp_path / "s.png")]) == 2
    assert "--size must be 0" in capsys.readouterr().err
