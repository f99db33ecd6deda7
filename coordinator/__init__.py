"""The transfer coordinator: stateless; runs each transfer against the shard owners.

See ``coordinator/PROTOCOL.md`` for the protocol, its states and recovery.
"""

from coordinator.coordinator import Coordinator, TransferItem

__all__ = ["Coordinator", "TransferItem"]
