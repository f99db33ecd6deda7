"""Console scripts: ledgerd, ledgerctl, ledger-bench, ledger-chaos."""
