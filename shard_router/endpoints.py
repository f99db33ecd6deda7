"""etcd client endpoints as operators give them: ``HOST:PORT[,HOST:PORT...]``.

A deployment runs one etcd member per region; every node and operator tool is given all of
them, so that losing a region's member (with the region) moves their calls to another member
(``EtcdOwnership._client``). Kept apart from ``shard_router.etcd`` so that command lines can
check the flag without importing the etcd client.
"""

from __future__ import annotations

import argparse


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` as (host, port) pairs; a missing host is 127.0.0.1.

    Raises:
        ValueError: an entry without a port number in 1..65535 (an empty list included).
    """
    out: list[tuple[str, int]] = []
    for item in endpoints.split(","):
        host, _, port = item.strip().rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {item.strip()!r} is not HOST:PORT")
        out.append((host or "127.0.0.1", int(port)))
    return out


def etcd_endpoints(value: str) -> str:
    """The ``--etcd`` flag's type: the value unchanged, refused with the reason if malformed."""
    try:
        parse_endpoints(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
