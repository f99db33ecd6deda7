"""Moved to ``ledger.runtime.tasks`` (imports need not point back into ``ledger``); this name
stays for modules that still import it."""

from ledger.runtime.tasks import live, spawn

__all__ = ["live", "spawn"]
