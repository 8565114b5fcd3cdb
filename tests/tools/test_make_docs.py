"""tools/make_docs.py: the committed docs/cli.md and docs/training.md block match the code, and --check notices."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from helpers import REPO, load_tool
from sdvae.cli.main import build_parser
from sdvae.train.config import config_help, config_keys

make_docs = load_tool("make_docs")
DOCS = REPO / "docs"
STALE = "{} is stale: run python tools/make_docs.py"


@pytest.fixture(scope="module")
def cli_page() -> str:
    """docs/cli.md as the script renders it now."""
    return make_docs.render_cli()


@pytest.fixture(scope="module")
def train_block() -> str:
    """The config-key block of docs/training.md as the script renders it now."""
    return make_docs.render_train_keys()


@pytest.fixture
def rendered_once(monkeypatch: pytest.MonkeyPatch, cli_page: str, train_block: str) -> None:
    """``main`` reuses the module's renderings (rendering is tested above; this keeps the --check tests fast)."""
    monkeypatch.setattr(make_docs, "render_cli", lambda: cli_page)
    monkeypatch.setattr(make_docs, "render_train_keys", lambda: train_block)


def _sections(page: str) -> dict[str, str]:
    """``{command: its section}`` of a rendered cli page."""
    parts = re.split(r"^## sdvae (\S+)\n", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_committed_pages_are_up_to_date(cli_page: str, train_block: str) -> None:
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == cli_page, STALE.format("docs/cli.md")
    committed = make_docs.train_block((DOCS / "training.md").read_text(encoding="utf-8"))
    assert committed == train_block, STALE.format("docs/training.md")


def test_every_command_and_option_is_on_the_page(cli_page: str) -> None:
    sections = _sections(cli_page)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sections) == [c.dest for c in sub._choices_actions]  # every command, in `sdvae --help` order
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            missing = [n for n in names if f"`{n}" not in sections[name]]
            assert not missing, f"sdvae {name}: {missing} not in docs/cli.md"
            plain = sections[name].replace("\\", "").replace("&lt;", "<")  # undo the Markdown escapes
            if action.help and "%(" not in action.help:  # the help itself, whitespace aside
                assert " ".join(action.help.split()) in plain, f"sdvae {name} {names[0]}: help not in docs/cli.md"
    assert "`--version`" in cli_page.split("## sdvae", 1)[0]


def test_every_config_key_is_in_the_training_block(train_block: str) -> None:
    listed = re.findall(r"^\s+--(\S+)", config_help(), flags=re.MULTILINE)  # what `train.py --help` prints
    assert listed == [key for key, *_ in config_keys()]
    for key in listed:
        assert f"- `{key}` (" in train_block, f"{key} not in docs/training.md"


def test_the_page_does_not_depend_on_the_machine(cli_page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "`--num-workers NUM_WORKERS` (default depends on the machine)" in cli_page
    monkeypatch.setenv("COLUMNS", "40")  # argparse would wrap usage to the terminal
    for count in (3, 96):
        monkeypatch.setattr(os, "cpu_count", lambda count=count: count)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, count=count: set(range(count)), raising=False)
        assert make_docs.render_cli() == cli_page


@pytest.mark.usefixtures("rendered_once")
def test_check_notices_a_stale_page_and_write_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       cli_page: str) -> None:
    docs = tmp_path / "docs"  # fresh pages, so this test does not fail along with the one above
    assert make_docs.main(["--check", "--docs", str(docs)]) == 1  # missing pages are stale too
    assert make_docs.main(["--docs", str(docs)]) == 0
    assert make_docs.main(["--check", "--docs", str(docs)]) == 0
    capsys.readouterr()

    cli = docs / "cli.md"
    cli.write_text(cli_page.replace("exact tiled", "exactly tiled", 1))
    assert make_docs.main(["--check", "--docs", str(docs)]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "cli.md is stale: run python tools/make_docs.py" in message
    assert "training.md" not in message

    assert make_docs.main(["--docs", str(docs)]) == 0
    assert cli.read_text() == cli_page
    assert make_docs.main(["--check", "--docs", str(docs)]) == 0


@pytest.mark.usefixtures("rendered_once")
def test_only_the_marked_block_of_training_md_is_rewritten(tmp_path: Path, train_block: str) -> None:
    docs = tmp_path / "docs"
    assert make_docs.main(["--docs", str(docs)]) == 0  # no page yet: a titled one holding the block
    created = (docs / "training.md").read_text()
    assert created.startswith("# Training\n") and "## Every config key" in created
    assert make_docs.train_block(created) == train_block

    prose = "# Training\n\nProse above.\n\n{}\n\nProse below, with `model.init` examples.\n"
    stale_block = f"{make_docs.BEGIN}\n- `old.key` (int, default `1`)\n{make_docs.END}"
    (docs / "training.md").write_text(prose.format(stale_block))
    assert make_docs.main(["--check", "--docs", str(docs)]) == 1
    assert make_docs.main(["--docs", str(docs)]) == 0
    assert (docs / "training.md").read_text() == prose.format(train_block)
