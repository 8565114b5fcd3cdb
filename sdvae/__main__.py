"""``python -m sdvae``: the same as the ``sdvae`` command."""

import sys

from sdvae.cli.main import main

sys.exit(main())
