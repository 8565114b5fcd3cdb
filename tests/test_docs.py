"""README.md and docs/: every relative link resolves (anchors included), the README stays a front door,
and its quickstarts run as written (on the `test` preset, so they take seconds)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, save_photo

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text)]


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github() -> None:
    assert _slug("Latent statistics and scaling") == "latent-statistics-and-scaling"
    assert _slug("## sdvae encode-dataset".lstrip("# ")) == "sdvae-encode-dataset"
    assert _slug("The launcher decides what the YAML leaves unset") == "the-launcher-decides-what-the-yaml-leaves-unset"
    assert _slug("What differs from diffusers' `train_autoencoderkl.py`") == (
        "what-differs-from-diffusers-train_autoencoderklpy")


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    in_code, long = False, []
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and len(line) > 120:
            long.append(n)
    assert not long, f"README lines over 120 characters outside code blocks: {long}"


def _block(marker: str) -> str:
    """The first fenced block after ``<!-- MARKER -->`` in the README."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)```", text, flags=re.S)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def _run_shell_block(block: str, cwd: Path, env: dict[str, str]) -> None:
    """Run each ``sdvae ...`` line of a quickstart with this interpreter, on the `test` preset."""
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "sdvae", f"quickstart line is not an sdvae command: {line}"
        if argv[1] in ("roundtrip", "encode-dataset"):
            argv += ["--model", "test"]
        proc = subprocess.run([sys.executable, "-m", "sdvae", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"


@pytest.mark.slow
def test_quickstarts_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    save_photo(tmp_path / "photo.jpg", 300, 200, seed=0)
    for i in range(5):
        save_photo(tmp_path / "photos" / f"{i}.jpg", 280 + 10 * i, 260, seed=i)

    _run_shell_block(_block("quickstart:roundtrip"), tmp_path, env)
    assert (tmp_path / "out" / "photo.recon.png").is_file() and (tmp_path / "out" / "photo.recon.compare.png").is_file()

    _run_shell_block(_block("quickstart:latents"), tmp_path, env)
    assert (tmp_path / "latents" / "sdvae_latents.json").is_file()

    code = _block("quickstart:latents-python") + "\nprint(tuple(z.shape), len(data))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "5"  # every photo became a row the loop read
