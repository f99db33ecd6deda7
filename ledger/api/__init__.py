"""The gRPC shell: servicers, conversions to and from ``ledger.v1`` messages, the server."""
