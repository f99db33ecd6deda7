"""Moved to ``ledger.runtime.failpoints`` (imports need not point back into ``ledger``); this
name stays for modules that still import it (the failpoints themselves live there, once)."""

from ledger.runtime.failpoints import arm, disarm, fault, hit

__all__ = ["arm", "disarm", "fault", "hit"]
