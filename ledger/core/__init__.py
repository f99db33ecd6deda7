"""The pure core of the ledger: rules for wallets, transfers and the shard state machine.

Nothing in this package performs I/O or imports grpc, cassandra, etcd, sqlite or generated
protobuf code. Adapters in the imperative shell (``ledger.owner``, ``ledger.store``,
``ledger.api``) carry out its effects.
"""
