"""Measurement tools that need the ledger's internals, kept with the tests rather than in the
product or in ``clients/`` (which may use the ledger only as a user or operator could).

* ``snapbench``: snapshot and takeover figures; it drives the snapshot code, the store
  adapters and ``ShardOwner`` directly, because those are what it measures.
"""
