"""Who may call the ledger: mutual TLS identities (``tls``), the development certificates
(``certs``), and the authorization policy every port enforces (``authz``)."""
