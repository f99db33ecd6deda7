"""``python -m clients.localcluster``: see ``clients.localcluster.cli``."""

import sys

from clients.localcluster.cli import main

sys.exit(main())
