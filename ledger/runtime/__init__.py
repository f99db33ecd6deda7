"""What every part of the shell shares and that depends on nothing of the project: supervised
background tasks (``tasks``), failpoints for crash drills (``failpoints``) and the clock
(``clock``).

It imports nothing from ``ledger``, ``coordinator`` or ``shard_router``, so each of them can
use it without an import pointing back out (``tests/unit/test_layers.py`` checks it).
"""
