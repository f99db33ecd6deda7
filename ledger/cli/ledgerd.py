"""``ledgerd``: run ledger servers.

    ledgerd dev  [--port 50051] [--data-dir .ledger-dev] [--shards 256] [--metrics-port 9464]
    ledgerd node --region r1 [--port 50061] [--cassandra 127.0.0.1:9042] [--etcd 127.0.0.1:2379]
                 [--regions r1,r2,r3] [--replication r1=1,r2=1,r3=1] [--single-region-dev]
                 [--metrics-port 0]

Both take the red-envelope rules (checked by the coordinator on every CreateEnvelope):
``--envelope-total-max-minor`` (20000: 200.00 CNY), ``--envelope-shares-max`` (100),
``--envelope-share-min-minor`` (1) and ``--envelope-expiry-max-s`` (86400: 24 h, also the
expiry of a request that gives none). Rules that cannot hold (a minimum share above the
maximum total, a zero) refuse the start with the reason.

``--tls-dir DIR`` turns on mutual TLS (``ledgerctl certs`` makes a development CA and
certificates; ``--tls-name`` picks this node's) and authorization (``--policy FILE``, default
the built-in policy). Without it a server listens on loopback addresses only, unless
``--insecure-plaintext`` accepts plaintext elsewhere explicitly.

``--metrics-port`` serves Prometheus metrics (ledger/metrics.py) at http://HOST:PORT/metrics
on the ``--host`` address; 0 serves none (the default of ``ledgerd node``).

In the durable mode a node refuses to start (with the reason) when the keyspace's replication
cannot keep an acknowledged transfer through the loss of a region; ``--single-region-dev``
accepts that, for development on one region only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

from coordinator.envelopes import EnvelopeRules
from ledger import constants as K
from ledger import logs, metrics, server, tracing
from ledger.core import constants as C
from shard_router.constants import CATCH_UP_WAIT_S, WARM_WAIT_S
from shard_router.endpoints import etcd_endpoints

# Exit status of a ledgerd that refused to start (port in use, data directory locked).
EXIT_REFUSED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledgerd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="everything in one process on the embedded store")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=50051)
    dev.add_argument("--data-dir", default=os.environ.get("LEDGER_DEV_DIR", ".ledger-dev"))
    dev.add_argument("--shards", type=int, default=256)
    node = sub.add_parser("node", help="a node of a region, on Cassandra and etcd")
    node.add_argument("--config", default=os.environ.get("LEDGER_CONFIG"),
                      help="TOML file with regions, Cassandra, etcd (ledger/config.py); "
                           "flags below override it")
    node.add_argument("--region", required=True)
    node.add_argument("--regions", default=None,
                      help="all regions, comma separated (default: just --region)")
    node.add_argument("--node-id", default=None)
    node.add_argument("--host", default="127.0.0.1")
    node.add_argument("--port", type=int, default=50061)
    node.add_argument("--cassandra", default=os.environ.get(
        "LEDGER_CASSANDRA", "127.0.0.1:9042"), help="contact point host:port of the region")
    node.add_argument("--replication", default=None,
                      help="dc=replicas,... for the keyspace (default: one per region)")
    node.add_argument("--keyspace", default="ledger")
    node.add_argument("--durability", choices=["durable", "local"], default="durable",
                      help="durable: journal appends are a serial quorum across regions "
                           "(RPO 0 on a region loss); local: LOCAL_SERIAL/LOCAL_QUORUM, "
                           "faster across cities, RPO > 0 (see README)")
    node.add_argument("--single-region-dev", action="store_true",
                      help="development and tests only: serve in the durable mode although "
                           "the keyspace cannot survive the loss of a region (e.g. one "
                           "region, {r1: 1}); without it such a node refuses to start")
    node.add_argument("--etcd", default=os.environ.get("LEDGER_ETCD", "127.0.0.1:2379"),
                      type=etcd_endpoints,
                      help="etcd's client endpoints, HOST:PORT[,HOST:PORT...]: give every "
                           "member (one per region), and a member's loss moves the calls to "
                           "the next")
    node.add_argument("--shards", type=int, default=256)
    node.add_argument("--etcd-prefix", default="/redledger")
    node.add_argument("--role", choices=["full", "coordinator"], default="full",
                      help="coordinator: serve the API and route, own no shards")
    node.add_argument("--lease-ttl-s", type=float, default=5.0)
    node.add_argument("--takeover-grace-s", type=float, default=2.0)
    node.add_argument("--warm-wait-s", type=float, default=WARM_WAIT_S,
                      help="a planned move (failback, failover --to) waits up to this long "
                           "for the new owner's warm standby, so that its takeover replays "
                           "only a tail (0: hand over at once, no warm standbys)")
    node.add_argument("--catch-up-wait-s", type=float, default=CATCH_UP_WAIT_S,
                      help="a planned move waits up to this long for the new owner's warm "
                           "standby when the new owner's store is catching up with the other "
                           "regions (Cassandra replaying hints to it)")
    node.add_argument("--no-dead-owner-probe", dest="dead_owner_probe", action="store_false",
                      help="do not revoke the lease of an owner whose address refuses "
                           "connections (a crashed process): wait for its TTL instead")
    node.add_argument("--no-failover-standbys", dest="failover_standbys",
                      action="store_false",
                      help="do not follow the shards this node would take over if their "
                           "owner failed (a takeover after a crash then loads the shard cold; "
                           "saves the memory and the reads of the standbys)")
    node.add_argument("--etcd-tls", action="store_true",
                      help="talk to etcd over mutual TLS with this node's certificate "
                           "(--tls-dir/--tls-name); see ledgerctl etcd-auth")
    dev.add_argument("--metrics-port", type=int, default=metrics.DEV_METRICS_PORT_DEFAULT,
                     help="serve /metrics on this port of --host (0: none)")
    node.add_argument("--metrics-port", type=int, default=metrics.METRICS_DISABLED,
                      help="serve /metrics on this port of --host (0, the default: none)")
    for p in (dev, node):
        p.add_argument("--tls-dir", default=os.environ.get("LEDGER_TLS_DIR"),
                       help="mutual TLS: ca.pem and this node's certificate and key "
                            "(ledgerctl certs' layout); every caller then needs a certificate "
                            "of that CA, and every call is authorized (--policy)")
        p.add_argument("--tls-name", default="node-n1",
                       help="the certificate's file name in --tls-dir, without .pem/.key")
        p.add_argument("--policy", default=os.environ.get("LEDGER_POLICY"),
                       help="authorization policy file (JSON; read again when it changes); "
                            "default: the built-in policy (README, Security)")
        p.add_argument("--insecure-plaintext", action="store_true",
                       help="serve without TLS on a non-loopback address (refused otherwise)")
        p.add_argument("--log-level", default=os.environ.get("LEDGER_LOG_LEVEL", "INFO"))
        p.add_argument("--otlp-endpoint",
                       default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
                       help="export OpenTelemetry traces to this OTLP/gRPC collector "
                            "(host:port or URL); default none: no tracing")
        p.add_argument("--log-format", choices=logs.FORMATS,
                       default=os.environ.get("LEDGER_LOG_FORMAT", "text"),
                       help="text, or json: one object per line with the request id")
        p.add_argument("--idempotency-memory-s", type=float,
                       default=K.IDEMPOTENCY_MEMORY_MS / 1000,
                       help="how long key records stay in owner memory before they are "
                            "answered from the store (seconds)")
        p.add_argument("--idempotency-retention-h", type=float, default=24.0,
                       help="how long idempotency keys and their results are kept (hours)")
        p.add_argument("--envelope-total-max-minor", type=int,
                       default=C.ENVELOPE_TOTAL_MINOR_MAX,
                       help="the most one red envelope may hold (minor units)")
        p.add_argument("--envelope-shares-max", type=int, default=C.ENVELOPE_SHARES_MAX,
                       help="the most shares one red envelope may be split into")
        p.add_argument("--envelope-share-min-minor", type=int,
                       default=C.ENVELOPE_SHARE_MINOR_MIN,
                       help="the least one share may get (minor units)")
        p.add_argument("--envelope-expiry-max-s", type=float,
                       default=C.ENVELOPE_EXPIRY_MS_MAX / 1000,
                       help="the longest a red envelope may stay open (seconds); also the "
                            "expiry of an envelope created without one")
    args = parser.parse_args(argv)
    # Which flags were given explicitly: they win over the configuration file.
    args._given = {a.lstrip("-").split("=")[0].replace("-", "_")
                   for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    node_name = ("dev" if args.command == "dev" else
                 (args.node_id or f"{args.region}-{os.getpid()}"))
    logs.configure(args.log_level, args.log_format, node_name)
    if tracing.configure(args.otlp_endpoint, node_name):
        logging.getLogger("ledgerd").info("traces to %s", args.otlp_endpoint)
    # Cassandra warns on every row batch above 5 KiB; the rows are packed on purpose
    # (ledger/store/cassandra/views.py), so these warnings would drown the log.
    logging.getLogger("cassandra.protocol").setLevel(logging.ERROR)
    try:
        asyncio.run(_dev(args) if args.command == "dev" else _node(args))
    except KeyboardInterrupt:
        pass
    except server.StartupRefused as exc:
        # A taken port or a data directory another process serves: say so, no traceback.
        print(f"ledgerd {args.command}: refusing to start: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    finally:
        tracing.disable()  # exports the spans still buffered
    return 0


def _retention_ms(args) -> int:
    if not 0 < args.idempotency_retention_h <= K.IDEMPOTENCY_RETENTION_H_MAX:
        raise SystemExit(f"ledgerd: --idempotency-retention-h must be in (0, "
                         f"{K.IDEMPOTENCY_RETENTION_H_MAX}] (key rows live "
                         f"{K.IDEMPOTENCY_RETENTION_H_MAX + 24} h in Cassandra)")
    return int(args.idempotency_retention_h * 3600 * 1000)


def _envelope_rules(args) -> EnvelopeRules:
    try:
        return EnvelopeRules(total_minor_max=args.envelope_total_max_minor,
                             shares_max=args.envelope_shares_max,
                             share_minor_min=args.envelope_share_min_minor,
                             expiry_ms_max=int(args.envelope_expiry_max_s * 1000))
    except (ValueError, OverflowError) as exc:
        raise SystemExit(
            f"ledgerd: bad red-envelope rules: {exc} (given --envelope-total-max-minor "
            f"{args.envelope_total_max_minor}, --envelope-shares-max {args.envelope_shares_max}"
            f", --envelope-share-min-minor {args.envelope_share_min_minor}, "
            f"--envelope-expiry-max-s {args.envelope_expiry_max_s:g})") from None


def _security(args) -> server.Security:
    from ledger.security.tls import TlsFiles

    tls = TlsFiles.from_dir(args.tls_dir, args.tls_name) if args.tls_dir else None
    return server.Security(tls=tls, policy=args.policy, insecure=args.insecure_plaintext)


def _etcd_tls(args):
    """The node's certificate for etcd (``--etcd-tls``), or None (plaintext)."""
    from ledger.security.tls import TlsFiles, channel_credentials

    if not args.etcd_tls:
        return None
    if not args.tls_dir:
        raise server.StartupRefused("--etcd-tls needs --tls-dir (the node's certificate)")
    return channel_credentials(TlsFiles.from_dir(args.tls_dir, args.tls_name))


def _principal(args) -> str | None:
    """This node's certificate identity (what its shard map changes are recorded under), or
    None without TLS (then ``node:<id>``)."""
    if not args.tls_dir:
        return None
    from ledger.security import certs
    from ledger.security.tls import TlsFiles

    return certs.describe(TlsFiles.from_dir(args.tls_dir, args.tls_name).cert.read_bytes())[0]


def _memory_ms(args) -> int:
    if args.idempotency_memory_s <= 0:
        raise SystemExit("ledgerd: --idempotency-memory-s must be positive")
    return int(args.idempotency_memory_s * 1000)


async def _dev(args) -> None:
    running = await server.start_dev(args.data_dir, args.host, args.port, args.shards,
                                     retention_ms=_retention_ms(args),
                                     memory_ms=_memory_ms(args),
                                     envelope_rules=_envelope_rules(args),
                                     security=_security(args))
    await _serve_metrics(running, args)
    print(f"ledgerd dev: serving ledger.v1 on {args.host}:{running.port} "
          f"({args.shards} shards, data in {args.data_dir})", flush=True)
    await server.run_until_signalled(running)


async def _serve_metrics(running: server.Running, args) -> None:
    """Serve /metrics for the life of ``running``; a taken port refuses the start (after the
    ledger's own port and data directory were checked, so those refusals keep their text)."""
    try:
        stop = metrics.serve(args.host, args.metrics_port)
    except OSError as exc:
        await running.close()
        raise server.StartupRefused(
            f"cannot serve metrics on {args.host}:{args.metrics_port}: "
            f"{exc.strerror or exc}; choose another --metrics-port (0: none)") from None

    async def close() -> None:
        await asyncio.to_thread(stop)
    running.closers.append(close)


def _apply_config(args) -> None:
    """Fill flags the operator did not give from the configuration file."""
    from ledger import config

    cfg = config.load(args.config)
    region = cfg.region(args.region)
    given = set(getattr(args, "_given", ()))
    if "regions" not in given:
        args.regions = ",".join(r.name for r in cfg.regions)
    if "cassandra" not in given:
        args.cassandra = region.cassandra[0]
        args.contact_points = list(region.cassandra)
    if "replication" not in given:
        args.replication = ",".join(f"{dc}={n}" for dc, n in cfg.replication.items())
    args.datacenters = [r.datacenter for r in cfg.regions]
    if "etcd" not in given:
        args.etcd = ",".join(cfg.etcd_endpoints)
    for flag, value in (("etcd_prefix", cfg.etcd_prefix), ("shards", cfg.shards),
                        ("keyspace", cfg.keyspace), ("lease_ttl_s", cfg.lease_ttl_s),
                        ("takeover_grace_s", cfg.takeover_grace_s)):
        if flag not in given:
            setattr(args, flag, value)
    args.datacenter = region.datacenter


# A node that cannot reach its store or etcd at start keeps trying for this long (s), like
# a process supervisor would restart it; a region's Cassandra node may take minutes to return.
STARTUP_RETRY_S = 300.0


async def _retrying(connect, what: str):
    from ledger.store.port import StoreError
    from ledger.store.replication import UnsafeReplication

    deadline = time.monotonic() + STARTUP_RETRY_S
    delay = 0.5
    while True:
        try:
            return await connect()
        except UnsafeReplication:
            raise  # a setup error, not an outage: retrying cannot fix it
        except (StoreError, OSError, ConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logging.getLogger("ledgerd").warning("%s not reachable yet (%s); retrying in "
                                                 "%.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _node(args) -> None:
    from ledger.store.cassandra import CassandraStore
    from shard_router.etcd import EtcdOwnership

    if args.config:
        _apply_config(args)
    # Checked before anything is connected to: a wrong flag is the operator's to fix.
    envelope_rules = _envelope_rules(args)

    from ledger.store.replication import UnsafeReplication

    regions = args.regions.split(",") if args.regions else [args.region]
    # The Cassandra datacenter of every region (the config may name them differently).
    datacenters = getattr(args, "datacenters", None) or regions
    host, _, port = args.cassandra.partition(":")
    try:
        # Without --replication: one replica in every region's datacenter.
        replication = ({dc: int(n) for dc, n in (p.split("=") for p in
                                                   args.replication.split(","))}
                       if args.replication else {dc: 1 for dc in datacenters})
    except ValueError:
        raise SystemExit(f"ledgerd node: --replication must be dc=replicas,... "
                         f"(got {args.replication!r})") from None
    contact_points = getattr(args, "contact_points", None) or [host]
    levels: dict[str, Any] = ({} if args.durability == "durable" else dict(
        serial_consistency="LOCAL_SERIAL", write_consistency="LOCAL_QUORUM",
        read_consistency="LOCAL_QUORUM"))
    try:
        store = await _retrying(lambda: CassandraStore.connect(
            [c.partition(":")[0] for c in contact_points], int(port or 9042),
            local_dc=getattr(args, "datacenter", args.region), keyspace=args.keyspace,
            replication=replication, regions=datacenters,
            require_region_survival=not args.single_region_dev, **levels), "Cassandra")
    except UnsafeReplication as exc:
        # The durable mode on a keyspace that loses data with a region: main() prints the
        # reason and exits with EXIT_REFUSED, before any shard is taken.
        raise server.StartupRefused(str(exc)) from None
    node_id = args.node_id or f"{args.region}-{os.getpid()}"
    ownership = EtcdOwnership(args.etcd, node_id, args.region, f"{args.host}:{args.port}",
                              regions, shard_count=args.shards, lease_ttl_s=args.lease_ttl_s,
                              takeover_grace_s=args.takeover_grace_s, prefix=args.etcd_prefix,
                              campaign=args.role == "full", warm_wait_s=args.warm_wait_s,
                              dead_owner_probe=args.dead_owner_probe,
                              catch_up_wait_s=args.catch_up_wait_s,
                              failover_standbys=args.failover_standbys,
                              credentials=_etcd_tls(args),
                              principal=_principal(args))
    # Appends are plain writes: the store acknowledges one only while this node's lease holds
    # (coordinator/PROTOCOL.md, "Fencing").
    store.bind_lease(ownership.lease_valid, ownership.confirm_held)
    try:
        running = await server.start(store, ownership, args.shards, args.host, args.port,
                                     retention_ms=_retention_ms(args),
                                     memory_ms=_memory_ms(args),
                                     envelope_rules=envelope_rules,
                                     security=_security(args))
    except BaseException:
        await store.close()
        raise
    await _serve_metrics(running, args)
    print(f"ledgerd node {node_id}: serving on {args.host}:{running.port}, "
          f"{len(running.node.owners)} shards owned", flush=True)
    await server.run_until_signalled(running)


if __name__ == "__main__":
    sys.exit(main())
