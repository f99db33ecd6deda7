"""Storage adapters for shard journals, snapshots and materialized rows (see ``port``)."""
