"""``python -m clients.chaos``: the same as ``ledger-chaos``."""

import sys

from clients.chaos.cli import main

sys.exit(main())
