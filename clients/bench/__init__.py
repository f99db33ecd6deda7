"""``ledger-bench``, the benchmark harness: the ledger under test as its own process
(``server``), the workloads through its gRPC API (``workloads``), the naive baselines
(``naive``) and the command line (``cli``). Not part of the ledger: it uses the ledger as a
client and an operator would."""
