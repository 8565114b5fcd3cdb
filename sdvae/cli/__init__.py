"""The ``sdvae`` command line: one module per group of subcommands, each with its parser and handler."""
