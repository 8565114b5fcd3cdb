"""The ``sdvae`` command line: the top-level parser and the entry point.

Each command module (:data:`COMMANDS`) registers its own subcommand parsers next to its handlers.
Every command turns bad input into one line on stderr and exit code 2 (see
:class:`sdvae.errors.UserError`), and any other OSError into one line and exit code 1; heavy imports
happen inside the commands so ``sdvae --help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdvae import __version__
from sdvae.cli import dataset, eval, generate, latents_file, roundtrip, weights
from sdvae.errors import UserError, first_line
from sdvae.heap import keep_freed_memory

EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 1  # an OSError no command turned into a UserError (an I/O failure, not bad input)
# In the order `sdvae --help` lists their subcommands.
COMMANDS = (roundtrip, latents_file, dataset, weights, eval, generate)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every ``sdvae`` subcommand."""
    parser = argparse.ArgumentParser(prog="sdvae", description="Stable-Diffusion-style KL image VAEs.")
    parser.add_argument("--version", action="version", version=f"sdvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdvae`` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    keep_freed_memory()  # the command owns its process: large tensors reuse freed memory (sdvae/heap.py)
    try:
        _quiet_libraries()
        return args.func(args)
    except UserError as err:
        print(f"sdvae: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # after UserError: a WriteError is both, and is the user's to fix (exit 2)
        where = f"{err.filename}: " if err.filename and str(err.filename) not in str(err) else ""
        print(f"sdvae: error: {where}{first_line(err, with_type=True)}", file=sys.stderr)
        return EXIT_OS_ERROR
    except KeyboardInterrupt:
        print("sdvae: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    # diffusers logs hub chatter at warning level; our own messages are what the user needs.
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
