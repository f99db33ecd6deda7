"""Deployment configuration: regions (cities), their Cassandra datacenters and contact points,
etcd, and the cluster-wide settings. Read from a TOML file (``--config``), e.g.::

    shards = 256
    keyspace = "ledger"
    lease_ttl_s = 5.0
    takeover_grace_s = 2.0

    [etcd]
    endpoints = ["127.0.0.1:2379"]
    prefix = "/redledger"

    [[regions]]
    name = "r1"                      # the city
    datacenter = "r1"                # its Cassandra datacenter (defaults to the name)
    cassandra = ["127.0.0.1:9042"]   # contact points in that datacenter
    replicas = 1                     # replicas of the keyspace there

    [[regions]]
    name = "r2"
    cassandra = ["127.0.0.2:9042"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from shard_router.endpoints import parse_endpoints


@dataclass(frozen=True)
class Region:
    name: str
    datacenter: str
    cassandra: tuple[str, ...]
    replicas: int = 1


@dataclass(frozen=True)
class Config:
    regions: tuple[Region, ...]
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_prefix: str = "/redledger"
    shards: int = 256
    keyspace: str = "ledger"
    lease_ttl_s: float = 5.0
    takeover_grace_s: float = 2.0
    extra: dict = field(default_factory=dict)

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise ConfigError(f"region {name!r} is not in the configuration "
                          f"({', '.join(r.name for r in self.regions)})")

    @property
    def replication(self) -> dict[str, int]:
        return {r.datacenter: r.replicas for r in self.regions}


class ConfigError(ValueError):
    """The configuration file is missing a field or has a wrong one (the message says which)."""


def load(path: str | Path) -> Config:
    """Read and check a configuration file.

    Raises:
        ConfigError: naming the field that is wrong.
    """
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    regions = []
    for i, item in enumerate(doc.get("regions", [])):
        name = item.get("name")
        if not name:
            raise ConfigError(f"regions[{i}].name is required")
        cassandra = item.get("cassandra") or []
        if not cassandra or not all(isinstance(c, str) and ":" in c for c in cassandra):
            raise ConfigError(f"regions[{i}].cassandra must list HOST:PORT contact points")
        replicas = int(item.get("replicas", 1))
        if replicas < 1:
            raise ConfigError(f"regions[{i}].replicas must be at least 1")
        regions.append(Region(name, item.get("datacenter", name), tuple(cassandra), replicas))
    if not regions:
        raise ConfigError("at least one [[regions]] entry is required")
    if len({r.name for r in regions}) != len(regions):
        raise ConfigError("region names must be unique")
    etcd = doc.get("etcd", {})
    endpoints = tuple(etcd.get("endpoints", ["127.0.0.1:2379"]))
    # Every member (one per region): a node's calls move to the next when one is lost.
    for i, endpoint in enumerate(endpoints):
        try:
            if not isinstance(endpoint, str) or len(parse_endpoints(endpoint)) != 1:
                raise ValueError(f"{endpoint!r} is not one HOST:PORT")
        except ValueError as exc:
            raise ConfigError(f"etcd.endpoints[{i}]: {exc}") from None
    if not endpoints:
        raise ConfigError("etcd.endpoints must list at least one HOST:PORT")
    shards = int(doc.get("shards", 256))
    if shards < 1:
        raise ConfigError("shards must be at least 1")
    return Config(tuple(regions), endpoints, etcd.get("prefix", "/redledger"), shards,
                  doc.get("keyspace", "ledger"), float(doc.get("lease_ttl_s", 5.0)),
                  float(doc.get("takeover_grace_s", 2.0)))
