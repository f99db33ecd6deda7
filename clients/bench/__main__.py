"""``python -m clients.bench``: the same as ``ledger-bench``."""

import sys

from clients.bench.cli import main

sys.exit(main())
