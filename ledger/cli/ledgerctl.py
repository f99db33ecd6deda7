"""``ledgerctl``: operator and finance commands.

    ledgerctl reconcile  [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--json]
    ledgerctl shards     --etcd HOST:PORT --regions r1,r2,r3 [--cassandra HOST:PORT --dc DC]
    ledgerctl replication --cassandra HOST:PORT [--dc DC] [--keyspace K] [--regions r1,r2,r3]
                          [--config FILE] [--json]
    ledgerctl failover   --from REGION --to REGION --etcd HOST:PORT --regions ...
    ledgerctl failback   --region REGION --etcd HOST:PORT --regions ...
    ledgerctl move-shard SHARD --to REGION --etcd HOST:PORT --regions ...
    ledgerctl restore-homes --etcd HOST:PORT --regions ... [--no-wait] [--json]
    ledgerctl etcd-auth  --etcd HOST:PORT --etcd-tls-dir DIR   (etcd RBAC: nodes, operators)
    ledgerctl shard-of   WALLET ... [--shards N] [--json]
    ledgerctl journal    [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--shard S ...] [--json]
    ledgerctl fence-check --shard S --epoch E [--data-dir DIR | --cassandra HOST:PORT --dc DC]
    ledgerctl commit-path [--json]
    ledgerctl envelope show ENVELOPE_ID [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--json]
    ledgerctl audit verify [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--shard S ...]
                           [--expect FILE] [--json]
    ledgerctl audit show   [--wallet W] [--principal P] [--since T] [--until T] [--shard S ...]
                           [--data-dir DIR | --cassandra HOST:PORT --dc DC] [--json]
    ledgerctl tail       [--shard S ...] [--after S:SEQ ...] [--follow] [--json]
                         [--target HOST:PORT] [--tls-dir DIR --tls-name NAME]
    ledgerctl top        --metrics URL [--metrics URL ...] [--interval S] [--once]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from ledger.store.port import StoreError
from shard_router.etcd import JOIN_TIMEOUT_S, EtcdOwnershipError
from ledger.core.constants import RECOVERY_TIMEOUT_MS
from ledger.reconcile import CHECKS, Report, envelope_report, reconcile
from shard_router.placement import failback_moves, failover_moves
from shard_router.endpoints import etcd_endpoints


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="embedded store of `ledgerd dev` (default .ledger-dev)")
    p.add_argument("--cassandra", default=os.environ.get("LEDGER_CASSANDRA"),
                   help="a Cassandra contact point HOST:PORT (instead of --data-dir)")
    p.add_argument("--dc", default=os.environ.get("LEDGER_REGION", "r1"),
                   help="the local datacenter (region) to read from")
    p.add_argument("--keyspace", default="ledger")
    p.add_argument("--shards", type=int, default=256)


async def _open_store(args):
    if args.cassandra:
        from ledger.store.cassandra import CassandraStore
        host, _, port = args.cassandra.partition(":")
        regions = getattr(args, "regions", None)
        # An operator tool reads and reports; it never refuses an unsafe keyspace (the
        # verdict is in store.replication_verdict, shown by `shards` and `replication`).
        return await CassandraStore.connect([host], int(port or 9042), local_dc=args.dc,
                                            keyspace=args.keyspace, create_schema=False,
                                            regions=regions.split(",") if regions else None,
                                            require_region_survival=False)
    from ledger.store.sqlite import SqliteStore
    path = os.path.join(args.data_dir or ".ledger-dev", "ledger.sqlite3")
    # A one-shot CLI check before anything else runs on the loop; nothing waits behind it.
    if not os.path.exists(path):  # noqa: ASYNC240
        raise SystemExit(f"ledgerctl: no embedded store at {path}")
    return await SqliteStore.open(path)


def _progress(done: int, total: int) -> None:
    if not sys.stderr.isatty() and done != total:
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\rreading journals [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} shards")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _print_report(report: Report, elapsed_s: float) -> None:
    print(f"Reconciliation of {report.shards} shards: {report.batches} journal batches, "
          f"{report.wallets} wallets, {report.transfers_committed} committed and "
          f"{report.transfers_refused} refused transfers ({elapsed_s:.1f} s)")
    print()
    print(f"{'currency':<10}{'balances':>22}{'in transit':>22}{'sum':>22}")
    for currency in sorted(set(report.totals) | set(report.in_transit)):
        total, transit = report.totals.get(currency, 0), report.in_transit.get(currency, 0)
        print(f"{currency:<10}{total:>22,}{transit:>22,}{total + transit:>22,}")
    if report.envelopes:
        m = report.envelope_minor
        print()
        print(f"envelopes kept by their owners: {report.envelopes}, grabs {report.grabs}; "
              f"grabbed {m.get('grabbed', 0):,}, refunded {m.get('refunded', 0):,}, left in "
              f"escrow {m.get('left', 0):,} (minor units, all currencies)")
    print()
    print(f"{'check':<22}{'result':<8}findings")
    for check in CHECKS:
        count = report.checks.get(check, 0)
        print(f"{check:<22}{'ok' if count == 0 else 'FAIL':<8}{count}")
    if report.findings:
        print()
        print(f"{'check':<22}{'shard':>6}  {'subject':<34}detail")
        for f in report.findings[:200]:
            shard = "-" if f.shard < 0 else str(f.shard)
            print(f"{f.check:<22}{shard:>6}  {f.subject:<34}{f.detail}")
        if len(report.findings) > 200:
            print(f"... and {len(report.findings) - 200} more (use --json for all)")
    print()
    print("RESULT: books are right" if report.clean else
          f"RESULT: {len(report.findings)} discrepancies")


async def _reconcile(args) -> int:
    store = await _open_store(args)
    try:
        started = time.monotonic()
        report = await reconcile(store, args.shards,
                                 recovery_timeout_ms=int(args.recovery_timeout_s * 1000),
                                 progress=None if args.json else _progress)
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            _print_report(report, time.monotonic() - started)
        return 0 if report.clean else 1
    finally:
        await store.close()


async def _envelope(args) -> int:
    """One envelope as its shard's journal has it (snapshot + journal after it, folded), or
    as the views keep it once its owner forgot it; every grab with its credit's state."""
    store = await _open_store(args)
    try:
        doc = await envelope_report(store, args.shards, args.envelope_id)
    finally:
        await store.close()
    if doc is None:
        print(f"ledgerctl envelope: no envelope {args.envelope_id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0 if not doc["problems"] else 1
    e = doc["envelope"]
    print(f"envelope {e['envelope_id']} on shard {doc['shard']} ({doc['source']}): {doc['state']}")
    print(f"  {e['kind']} from {e['sender_wallet_id']}: {e['total_minor']:,} {e['currency']} "
          f"in {e['shares']} shares; left {e['left_minor']:,} in {e['left_shares']} shares; "
          f"refunded {e['refunded_minor']:,}; escrow {doc['escrow_minor']}")
    print(f"  created {e['created_at_ms']}, expires {e['expires_at_ms']}, funded "
          f"{e['funded_at_ms'] or '-'}, closed {e['closed_at_ms'] or '-'}")
    print(f"  {'pos':>5}  {'receiver':<34}{'amount':>12}  {'credit':<10}transfer")
    for g in doc["grabs"]:
        print(f"  {g['position']:>5}  {g['receiver_wallet_id']:<34}{g['amount_minor']:>12,}  "
              f"{g['credit']:<10}{g['transfer_id']}")
    if doc["luckiest"] is not None:
        print(f"  luckiest: position {doc['luckiest']['position']} "
              f"({doc['luckiest']['amount_minor']:,})")
    for problem in doc["problems"]:
        print(f"  PROBLEM: {problem}")
    return 0 if not doc["problems"] else 1


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def _audit(args) -> int:
    """``audit verify``: exit 0 if every chain is intact, 1 with each problem named (shard,
    batch, what). ``audit show``: the records that match every filter given."""
    from ledger import audit_report

    shards = args.shard if args.shard else range(args.shards)
    if args.action == "verify":
        anchors = None
        if args.expect:
            try:
                text = await asyncio.to_thread(_read_text, args.expect)
                anchors = audit_report.anchors_from_json(json.loads(text))
            except (OSError, ValueError) as exc:
                print(f"ledgerctl audit verify: --expect {args.expect}: {exc}", file=sys.stderr)
                return 2
        store = await _open_store(args)
        try:
            report = await audit_report.verify(store, shards, anchors)
        finally:
            await store.close()
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            chained = [(s, c) for s, c in sorted(report.shards.items()) if c.head.seq]
            print(f"{len(report.shards)} shards, {len(chained)} with audit rows, "
                  f"{sum(c.rows for _, c in chained)} rows, "
                  f"{sum(c.records for _, c in chained)} records")
            for p in report.problems:
                print(f"PROBLEM shard {p.shard} batch {p.seq}: {p.what}")
            print("RESULT: every audit chain is intact" if report.ok else
                  f"RESULT: {len(report.problems)} problems")
        return 0 if report.ok else 1
    try:
        since = audit_report.parse_time_ms(args.since) if args.since else None
        until = audit_report.parse_time_ms(args.until) if args.until else None
    except ValueError as exc:
        print(f"ledgerctl audit show: {exc}", file=sys.stderr)
        return 2
    store = await _open_store(args)
    try:
        found = [shown async for shown in audit_report.show(
            store, shards, wallet=args.wallet, principal=args.principal, since_ms=since,
            until_ms=until)]
    finally:
        await store.close()
    if args.json:
        print(json.dumps([shown.to_json() for shown in found], indent=2))
    else:
        for shown in found:
            print(audit_report.format_record(shown))
    return 0


# --- shard map and ownership ------------------------------------------------------------

# How long failover / failback / move-shard wait for the new owners (s). An old owner hands a
# shard over once its successor holds a warm standby (up to ``WARM_WAIT_S``): a move onto a
# region that cannot read its store yet completes later, by itself; this only bounds the wait
# of the command, which then names the shards still pending.
MOVE_TIMEOUT_S = 120.0
# How often they look at etcd's owner keys while they wait (s); the time they report is
# accurate to this.
MOVE_POLL_S = 0.05


def _etcd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("LEDGER_CONFIG"),
                   help="TOML deployment file (ledger/config.py): etcd, regions, shards")
    p.add_argument("--etcd", default=os.environ.get("LEDGER_ETCD", "127.0.0.1:2379"),
                      type=etcd_endpoints,
                      help="etcd's client endpoints, HOST:PORT[,HOST:PORT...]: give every "
                           "member (one per region), and a member's loss moves the calls to "
                           "the next")
    p.add_argument("--etcd-prefix", default="/redledger")
    p.add_argument("--etcd-join-timeout-s", type=float, default=JOIN_TIMEOUT_S,
                   help="how long to keep trying while etcd is unreachable or slow (a member "
                        "down, a leader election) before giving up")
    p.add_argument("--etcd-tls-dir", default=os.environ.get("LEDGER_ETCD_TLS_DIR"),
                   help="mutual TLS to etcd: ca.pem and the operator's certificate")
    p.add_argument("--etcd-tls-name", default="operator-ops",
                   help="the certificate's file name in --etcd-tls-dir, without .pem/.key")
    p.add_argument("--regions", default=os.environ.get("LEDGER_REGIONS", "r1"),
                   help="all regions, comma separated")
    p.add_argument("--shards", type=int, default=256)


def _etcd_files(args):
    """The operator's certificate for etcd (``--etcd-tls-dir``), or None (plaintext)."""
    from ledger.security.tls import TlsFiles

    if not getattr(args, "etcd_tls_dir", None):
        return None
    return TlsFiles.from_dir(args.etcd_tls_dir, args.etcd_tls_name)


def _operator(args) -> str:
    """Who makes a shard map change, as the shard's audit chain records it: the identity of
    the certificate used with etcd, or (plaintext etcd: nothing proves it) the local user,
    marked ``unverified:``."""
    files = _etcd_files(args)
    if files is not None:
        from ledger.security import certs
        who = certs.describe(files.cert.read_bytes())[0]
        if who:
            return who
    import getpass
    import socket
    return f"unverified:{getpass.getuser()}@{socket.gethostname()}"


def _etcd_tls(args):
    """Channel credentials for etcd from ``--etcd-tls-dir``, or None (plaintext)."""
    from ledger.security.tls import channel_credentials

    files = _etcd_files(args)
    return channel_credentials(files) if files is not None else None


async def _etcd_auth(args) -> int:
    """Turn on etcd's access control for the ledger (``ledger.security.etcd_auth``)."""
    from ledger.security.etcd_auth import LEDGER_USERS, enable_rbac

    tls = _etcd_files(args)
    if tls is None:
        print("ledgerctl etcd-auth: --etcd-tls-dir is required (etcd with client "
              "certificates)", file=sys.stderr)
        return 2
    try:
        await asyncio.to_thread(enable_rbac, args.etcd, tls, args.etcd_prefix)
    except Exception as exc:  # grpc.RpcError or an unreadable file: say which, exit 1
        print(f"ledgerctl etcd-auth: {exc}", file=sys.stderr)
        return 1
    print(f"etcd authentication on: users {', '.join(LEDGER_USERS)} may use "
          f"{args.etcd_prefix}/, no one else")
    return 0


async def _view(args):
    """A read-only view of the shard map and owners (never campaigns, owns nothing)."""
    from shard_router.etcd import EtcdOwnership

    if getattr(args, "config", None):
        from ledger import config
        cfg = config.load(args.config)
        args.etcd, args.etcd_prefix = ",".join(cfg.etcd_endpoints), cfg.etcd_prefix
        args.regions, args.shards = ",".join(r.name for r in cfg.regions), cfg.shards

    view = EtcdOwnership(args.etcd, f"ledgerctl-{os.getpid()}", "-", "",
                         args.regions.split(","), shard_count=args.shards,
                         prefix=args.etcd_prefix, campaign=False,
                         join_timeout_s=args.etcd_join_timeout_s,
                         credentials=_etcd_tls(args), principal=_operator(args))

    async def ignore(shard: int, epoch: int) -> None:
        return None
    await view.start(ignore)
    return view


async def _shards(args) -> int:
    view = await _view(args)
    store = await _open_store(args) if args.cassandra or args.data_dir else None
    try:
        rows = []
        for p in view.placements():
            owner = view.owner(p.shard)
            position = await store.journal_position(p.shard) if store else None
            rows.append({
                "shard": p.shard, "home": p.home_region, "origin": view.origin(p.shard) or "",
                "owner": owner.node_id if owner else "", "owner_region": owner.region
                if owner else "", "epoch": owner.epoch if owner else 0,
                "journal_epoch": position[0] if position else None,
                "journal_head": position[1] if position else None,
                "replay_batches": position[1] - position[2] if position else None})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'shard':>5}  {'home':<6}{'origin':<8}{'owner':<22}{'region':<8}"
                  f"{'epoch':>10}{'journal head':>14}{'to replay':>11}")
            for r in rows:
                head = "-" if r["journal_head"] is None else r["journal_head"]
                replay = "-" if r["replay_batches"] is None else r["replay_batches"]
                print(f"{r['shard']:>5}  {r['home']:<6}{r['origin']:<8}"
                      f"{r['owner'] or 'NONE':<22}{r['owner_region']:<8}{r['epoch']:>10}"
                      f"{head:>14}{replay:>11}")
            unowned = sum(1 for r in rows if not r["owner"])
            by_region: dict[str, int] = {}
            for r in rows:
                by_region[r["owner_region"] or "none"] = by_region.get(
                    r["owner_region"] or "none", 0) + 1
            print(f"\n{len(rows)} shards; owned per region: {by_region}; unowned: {unowned}")
            verdict = getattr(store, "replication_verdict", None)
            if verdict is not None:
                print(f"keyspace {args.keyspace}: {verdict.describe()}")
        return 0 if all(r["owner"] for r in rows) else 1
    finally:
        await view.close()
        if store is not None:
            await store.close()


async def _replication(args) -> int:
    """Show the keyspace's replication and whether an acknowledged commit survives the loss
    of any one region. Exit 0 if it does, 1 if not (usable as a deployment check)."""
    if args.config:
        from ledger import config
        cfg = config.load(args.config)
        given = set(getattr(args, "_given", ()))
        if "regions" not in given:
            args.regions = ",".join(r.datacenter for r in cfg.regions)
        if "keyspace" not in given:
            args.keyspace = cfg.keyspace
        if not args.cassandra:
            args.cassandra = cfg.regions[0].cassandra[0]
            if "dc" not in given:
                args.dc = cfg.regions[0].datacenter
    if not args.cassandra:
        raise SystemExit("ledgerctl replication: --cassandra HOST:PORT (or --config) is "
                         "required")
    store = await _open_store(args)
    try:
        verdict = store.replication_verdict
        doc = {"keyspace": args.keyspace,
               "regions": args.regions.split(",") if args.regions else [],
               **verdict.as_dict()}
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"keyspace {args.keyspace}")
            print(f"{'datacenter':<14}{'replicas':>9}")
            for dc, n in sorted(verdict.replication.items()):
                print(f"{dc:<14}{n:>9}")
            print(f"total {verdict.total} replicas; a SERIAL/QUORUM commit needs "
                  f"{verdict.quorum}")
            if verdict.survives_region_loss:
                print("survives the loss of any one region: yes")
            else:
                print("survives the loss of any one region: NO")
                for reason in verdict.reasons:
                    print(f"  - {reason}")
        return 0 if verdict.survives_region_loss else 1
    finally:
        await store.close()


async def _move(args, mapping: dict[int, str], origins: dict[int, str] | None,
                view, action: str) -> int:
    """Re-home shards and wait until each is served by a node of its new home region. The
    change (who, ``action``, ``--reason``) goes with the map entries; each new owner records
    it in its shard's audit chain. With ``--json``: one document at the end (the change, the
    shards moved with their new regions, how long until all were served, those still not)."""
    as_json = args.json

    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    if not mapping:
        if as_json:
            print(json.dumps({"action": action, "change_id": "", "moved": {},
                              "served_after_s": 0.0, "pending": []}))
        else:
            print("nothing to move")
        return 0
    started = time.monotonic()
    change_id = await view.set_homes(mapping, origins, action=action,
                                     reason=getattr(args, "reason", "") or "")
    say(f"change {change_id} by {view.principal}")
    say(f"moving {len(mapping)} shards ...")
    while True:
        pending = [s for s, r in mapping.items()
                   if (view.owner(s) is None or view.owner(s).region != r)]
        took_s = round(time.monotonic() - started, 3)
        if not pending or took_s > MOVE_TIMEOUT_S:
            break
        await asyncio.sleep(MOVE_POLL_S)
    if as_json:
        print(json.dumps({"action": action, "change_id": change_id,
                          "moved": {str(s): r for s, r in sorted(mapping.items())},
                          "served_after_s": None if pending else took_s,
                          "pending": sorted(pending),
                          "catching_up": view.catching_up_nodes()}))
    elif pending:
        behind = view.catching_up_nodes()
        print(f"timeout: {len(pending)} shards not yet served by their new region (no live "
              f"node there, or its node cannot read its store yet: their owners keep serving "
              f"them until it can): {pending[:20]}"
              + (f"; nodes whose store is still catching up with the other regions: "
                 f"{', '.join(behind)}" if behind else ""))
    else:
        print(f"done: {len(mapping)} shards served by their new home regions after "
              f"{took_s:.1f} s")
    return 1 if pending else 0


async def _failover(args) -> int:
    view = await _view(args)
    try:
        if args.to not in args.regions.split(","):
            raise SystemExit(f"ledgerctl: unknown region {args.to}")
        # A planned failover remembers where the shards came from, for failback.
        mapping, origins = failover_moves(
            {p.shard: p.home_region for p in view.placements()}, args.src, args.to)
        return await _move(args, mapping, origins, view, "Failover")
    finally:
        await view.close()


async def _failback(args) -> int:
    view = await _view(args)
    try:
        mapping = failback_moves({p.shard: view.origin(p.shard) for p in view.placements()},
                                 args.region)
        return await _move(args, mapping, None, view, "Failback")
    finally:
        await view.close()


async def _move_shard(args) -> int:
    view = await _view(args)
    try:
        if not 0 <= args.shard < args.shards:
            raise SystemExit(f"ledgerctl: shard must be 0..{args.shards - 1}")
        return await _move(args, {args.shard: args.to}, None, view, "MoveShard")
    finally:
        await view.close()


# --- drill support: what fault drills (ledger-chaos) check, as an operator would ---------

# Journal batches read per request by `journal` and `fence-check`.
JOURNAL_PAGE_BATCHES = 500


async def _read_whole_journal(store, shard: int) -> list:
    """Every batch of ``shard`` still in the journal (after its latest snapshot), in order."""
    out: list = []
    after = 0
    while True:
        page = await store.read_journal(shard, after, JOURNAL_PAGE_BATCHES)
        out.extend(page)
        if len(page) < JOURNAL_PAGE_BATCHES:
            return out
        after = page[-1].seq


async def _restore_homes(args) -> int:
    """Home every shard in its default region again (shard s in regions[s % n]).

    Failovers are sticky: a region that takes shards over stays their home until an
    operator moves them back. This puts the whole map back to where a fresh one starts.
    """
    from shard_router.etcd import default_home

    view = await _view(args)
    try:
        regions = args.regions.split(",")
        homes = {s: default_home(s, regions) for s in range(args.shards)}
        mapping = {p.shard: homes[p.shard] for p in view.placements()
                   if p.home_region != homes[p.shard]}
        if args.no_wait or args.json:
            if mapping:
                await view.set_homes(mapping, action="RestoreHomes",
                                     reason=args.reason or "")
            if args.json:
                print(json.dumps({"homes": {str(s): r for s, r in homes.items()},
                                  "moved": {str(s): r for s, r in mapping.items()}}))
            else:
                print(f"re-homed {len(mapping)} shards")
            return 0
        return await _move(args, mapping, None, view, "RestoreHomes")
    finally:
        await view.close()


async def _certs(args) -> int:
    """A development CA, a certificate per identity and the default policy, in --dir."""
    import json
    from pathlib import Path

    from ledger.security import authz, certs

    out = Path(args.dir)
    if (out / "ca.pem").exists() and not args.force:
        print(f"ledgerctl certs: {out}/ca.pem exists (--force makes a new CA)", file=sys.stderr)
        return 1
    def names(text: str) -> tuple[str, ...]:
        return tuple(n for n in text.split(",") if n)

    issued = certs.make_dev_pki(out, nodes=names(args.nodes), services=names(args.services),
                                operators=names(args.operators))
    (out / "policy.json").write_text(json.dumps(authz.DEFAULT_POLICY, indent=2) + "\n")
    for name, files in issued.items():
        print(f"{name:<22} {files.cert}")
    print(f"{'policy':<22} {out / 'policy.json'}")
    return 0


_DURATION_UNITS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _limit_value(text: str) -> int:
    """A limit flag: ``default`` (follow the ledger's default: -1), ``none`` (0), a number,
    or for windows a duration such as ``90s``, ``1h``, ``7d``."""
    low = text.strip().lower()
    if low == "default":
        return -1
    if low in ("none", "off"):
        return 0
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if low.endswith(unit) and low[:-len(unit)].isdigit():
            return int(low[:-len(unit)]) * _DURATION_UNITS[unit]
    try:
        return int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number, a duration like 1h, 'none' or "
                                         "'default'") from None


def _print_wallet(w) -> None:
    r = w.risk
    velocity = ("none" if not r.window_ms else
                f"{r.max_amount_minor or 'any'} {w.currency} and {r.max_count or 'any'} debits "
                f"per {r.window_ms // 1000} s ({'own' if r.velocity_own else 'default'}); "
                f"used {r.used_amount_minor} {w.currency} in {r.used_count} debits")
    step_up = (f"above {r.step_up_above_minor} ({'own' if r.step_up_own else 'default'})"
               if r.step_up_above_minor else "none")
    print(f"{w.wallet_id}: balance {w.balance_minor} {w.currency}, available "
          f"{w.available_minor}, {'FROZEN' if w.frozen else 'not frozen'}, shard {w.shard}\n"
          f"  velocity limit: {velocity}\n  step-up: {step_up}; confirmed devices: "
          f"{', '.join(r.devices) or 'none'}")


def _client_tls(args):
    """Client credentials from ``--tls-dir``/``--tls-name`` (mutual TLS), or None."""
    from clients import mutual_tls

    if not args.tls_dir:
        return None
    d = args.tls_dir.rstrip("/")
    return mutual_tls(f"{d}/ca.pem", f"{d}/{args.tls_name}.pem", f"{d}/{args.tls_name}.key")


async def _tail(args) -> int:
    """Print the change stream (``WatchChanges``): a line per event, or JSON lines (one per
    batch: shard, seq, epoch, events with their fields). Ends at the heads of the start
    unless ``--follow``; exit 1 naming the position if the batches after it were compacted."""
    from clients import LedgerClient, LedgerError

    try:
        positions = {int(s): int(q) for s, q in (p.split(":") for p in args.after)}
    except ValueError:
        print("ledgerctl tail: --after takes SHARD:SEQ", file=sys.stderr)
        return 2
    async with LedgerClient(args.target, caller="ledgerctl",
                            credentials=_client_tls(args)) as ledger:
        try:
            async for batch in ledger.watch_changes(args.shard, positions, args.follow):
                if args.json:
                    print(json.dumps({"shard": batch.shard, "seq": batch.seq,
                                      "epoch": batch.epoch,
                                      "events": [{"type": e.type, **json.loads(e.json)}
                                                 for e in batch.events]}), flush=True)
                    continue
                for e in batch.events:
                    print(f"{batch.shard:>5} {batch.seq:>8} {batch.epoch:>15}  {e.type:<22} "
                          f"{e.json}", flush=True)
        except LedgerError as exc:
            print(f"ledgerctl tail: {exc}", file=sys.stderr)
            return 1
    return 0


async def _top(args) -> int:
    """The live terminal view of the cluster (``ledger.cli.top``)."""
    from ledger.cli import top

    return await asyncio.to_thread(top.run, args.metrics or ["http://127.0.0.1:9464/metrics"],
                                   args.interval, args.once)


async def _wallet(args) -> int:
    """Risk controls on a wallet through a running ledger (operators' certificate under
    mutual TLS): show, freeze / unfreeze, velocity limits and step-up threshold (of a wallet,
    or with ``--default`` of every wallet), confirm / forget a device."""
    from clients import LedgerClient, LedgerError

    if args.action == "limits" and bool(args.wallet_id) == args.default:
        print("ledgerctl wallet limits: name a wallet, or --default (not both)",
              file=sys.stderr)
        return 2
    if args.action != "limits" and not args.wallet_id:
        print(f"ledgerctl wallet {args.action}: name a wallet", file=sys.stderr)
        return 2
    if args.action in ("confirm-device", "forget-device") and not args.device:
        print(f"ledgerctl wallet {args.action}: --device is required", file=sys.stderr)
        return 2
    async with LedgerClient(args.target, caller="ledgerctl",
                            credentials=_client_tls(args)) as ledger:
        try:
            if args.action in ("freeze", "unfreeze"):
                await ledger.set_wallet_frozen(args.wallet_id, args.action == "freeze",
                                               args.reason)
            elif args.action == "limits":
                inherit = -1 if args.wallet_id else 0
                done = await ledger.set_risk_limits(
                    args.wallet_id or "", window_ms=_given(args.window, inherit),
                    max_amount_minor=_given(args.max_amount, 0),
                    max_count=_given(args.max_count, 0),
                    step_up_above_minor=_given(args.step_up_above, inherit),
                    reason=args.reason)
                if args.default:
                    print(f"default risk limits set on {done.shards} shards")
                    return 0
            elif args.action in ("confirm-device", "forget-device"):
                await ledger.confirm_device(args.wallet_id, args.device,
                                            forget=args.action == "forget-device",
                                            reason=args.reason)
            _print_wallet(await ledger.get_wallet(args.wallet_id))
        except LedgerError as exc:
            print(f"ledgerctl wallet {args.action}: {exc}", file=sys.stderr)
            return 1
    return 0


def _given(value: int | None, otherwise: int) -> int:
    return otherwise if value is None else value


async def _shard_of(args) -> int:
    """Which shard each wallet id hashes to (the same stable hash the router uses)."""
    from shard_router.hashing import shard_of

    result = {w: shard_of(w, args.shards) for w in args.wallets}
    if args.json:
        print(json.dumps(result))
    else:
        for wallet, shard in result.items():
            print(f"{shard:>5}  {wallet}")
    return 0


async def _journal(args) -> int:
    """Per shard: the writer epochs along the journal, as runs [epoch, batches].

    Writer epochs must never go back along a journal (a deposed owner cannot append); the
    runs show it at a glance, and how many batches each epoch wrote. Exit 1 if an epoch
    goes back anywhere.
    """
    store = await _open_store(args)
    try:
        shards = args.shard if args.shard else list(range(args.shards))
        doc: dict[str, dict] = {}
        monotonic = True
        for shard in shards:
            runs: list[list[int]] = []
            last_seq = 0
            for batch in await _read_whole_journal(store, shard):
                if runs and runs[-1][0] == batch.epoch:
                    runs[-1][1] += 1
                else:
                    runs.append([batch.epoch, 1])
                last_seq = batch.seq
            ok = all(b[0] >= a[0] for a, b in zip(runs, runs[1:]))
            monotonic = monotonic and ok
            doc[str(shard)] = {"last_seq": last_seq, "epoch_runs": runs,
                               "epochs_monotonic": ok}
        if args.json:
            print(json.dumps({"shards": doc, "epochs_monotonic": monotonic}))
        else:
            print(f"{'shard':>5}  {'last seq':>9}  epochs (epoch x batches)")
            for shard, row in doc.items():
                runs_text = " ".join(f"{e}x{n}" for e, n in row["epoch_runs"]) or "-"
                flag = "" if row["epochs_monotonic"] else "  EPOCH GOES BACK"
                print(f"{shard:>5}  {row['last_seq']:>9}  {runs_text}{flag}")
        return 0 if monotonic else 1
    finally:
        await store.close()


async def _fence_check(args) -> int:
    """Prove a writer epoch is fenced: append an empty batch to ``--shard`` with ``--epoch``.

    This is what a deposed owner's late write looks like to the journal: the store must
    refuse it, and the journal read back afterwards must not hold it (on Cassandra the
    row of a deposed epoch is written, past the batch its successor started after, and
    never counts). Exit 0 if refused and absent, 1 if it was applied (an empty batch, which
    changes no balance) or is in the journal, 2 if the store could not say or ``--epoch``
    is the shard's current epoch (nothing to prove).
    """
    from ledger.core import codec
    from ledger.store.port import Fenced

    store = await _open_store(args)
    try:
        batches = await _read_whole_journal(store, args.shard)
        seq = (batches[-1].seq if batches else 0) + 1
        doc: dict = {"shard": args.shard, "epoch": args.epoch, "seq": seq}
        current = (await store.journal_position(args.shard))[0]
        if args.epoch >= current:
            doc.update(refused=False, error=f"epoch {args.epoch} is not deposed (the "
                                            f"shard's epoch is {current}): nothing to prove")
        else:
            try:
                await store.append(args.shard, args.epoch, seq, codec.dumps([]), [])
            except Fenced as exc:
                doc.update(refused=True, error=str(exc))
            except Exception as exc:  # unreachable store etc.: not a proof either way
                doc.update(refused=False, error=f"{type(exc).__name__}: {exc}")
            else:
                doc.update(refused=False, error="APPLIED: the epoch could append")
            after = await _read_whole_journal(store, args.shard)
            doc["in_journal"] = any(b.seq == seq and b.epoch == args.epoch for b in after)
            if doc["in_journal"]:
                doc.update(refused=False, error=f"APPLIED: batch {seq} of epoch {args.epoch} "
                                                f"is in the journal ({doc['error']})")
        print(json.dumps(doc) if args.json else
              f"shard {args.shard} epoch {args.epoch} seq {seq}: "
              f"{'refused (fenced)' if doc['refused'] else doc['error']}")
        if doc["refused"]:
            return 0
        return 1 if doc["error"].startswith("APPLIED") else 2
    finally:
        await store.close()


async def _commit_path(args) -> int:
    """The consistency levels of the commit path: the Cassandra store's defaults, which
    ``ledgerd node`` does not override."""
    import inspect

    from cassandra import ConsistencyLevel

    from ledger.store.cassandra import CassandraStore

    params = inspect.signature(CassandraStore.connect).parameters

    def name(p: str) -> str:
        value = params[p].default
        return value if isinstance(value, str) else ConsistencyLevel.value_to_name[value]

    doc = {"journal_cas_serial_consistency": name("serial_consistency"),
           "commit_consistency": name("write_consistency"),
           "read_consistency": name("read_consistency"),
           "source": "ledger.store.cassandra.CassandraStore.connect defaults (ledgerd node "
                     "sets none): the append is one LWT (Paxos at SERIAL across datacenters, "
                     "commit at QUORUM); a CAS timeout is resolved with a SERIAL read"}
    if args.json:
        print(json.dumps(doc))
    else:
        for key, value in doc.items():
            print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledgerctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconcile", help="prove the books from the store; exit 1 if not")
    _store_args(rec)
    rec.add_argument("--json", action="store_true", help="machine-readable report")
    rec.add_argument("--recovery-timeout-s", type=float, default=RECOVERY_TIMEOUT_MS / 1000,
                     help="a transfer in doubt longer than this is a discrepancy")
    shards = sub.add_parser("shards", help="shard map: homes, owners, epochs, journal heads")
    _etcd_args(shards)
    shards.add_argument("--cassandra", default=None, help="also read journal heads: HOST:PORT")
    shards.add_argument("--dc", default="r1")
    shards.add_argument("--keyspace", default="ledger")
    shards.add_argument("--data-dir", default=None)
    shards.add_argument("--json", action="store_true")
    repl = sub.add_parser("replication", help="the keyspace's replication and whether it "
                          "survives the loss of a region; exit 1 if not")
    repl.add_argument("--config", default=os.environ.get("LEDGER_CONFIG"),
                      help="TOML deployment file: regions (datacenters), keyspace, Cassandra")
    repl.add_argument("--cassandra", default=os.environ.get("LEDGER_CASSANDRA"),
                      help="a Cassandra contact point HOST:PORT")
    repl.add_argument("--dc", default=os.environ.get("LEDGER_REGION", "r1"),
                      help="the local datacenter to connect through")
    repl.add_argument("--keyspace", default="ledger")
    repl.add_argument("--regions", default=os.environ.get("LEDGER_REGIONS"),
                      help="the datacenters of all regions, comma separated: each must hold "
                           "replicas")
    repl.add_argument("--json", action="store_true")
    failover = sub.add_parser("failover", help="planned handover of a region's shards")
    _etcd_args(failover)
    failover.add_argument("--from", dest="src", required=True)
    failover.add_argument("--to", required=True)
    failover.add_argument("--reason", default="", help="recorded in the audit trail")
    failover.add_argument("--json", action="store_true",
                          help="print the change, the moves and the time taken as JSON")
    failback = sub.add_parser("failback", help="move shards home to a recovered region")
    _etcd_args(failback)
    failback.add_argument("--region", required=True)
    failback.add_argument("--reason", default="", help="recorded in the audit trail")
    failback.add_argument("--json", action="store_true",
                          help="print the change, the moves and the time taken as JSON")
    move = sub.add_parser("move-shard", help="re-home one shard")
    _etcd_args(move)
    move.add_argument("shard", type=int)
    move.add_argument("--to", required=True)
    move.add_argument("--reason", default="", help="recorded in the audit trail")
    move.add_argument("--json", action="store_true",
                      help="print the change, the move and the time taken as JSON")
    restore = sub.add_parser("restore-homes", help="home every shard in its default region "
                             "again (shard s in regions[s % n])")
    _etcd_args(restore)
    restore.add_argument("--reason", default="", help="recorded in the audit trail")
    restore.add_argument("--no-wait", action="store_true",
                         help="set the homes and return; do not wait for the new owners")
    restore.add_argument("--json", action="store_true",
                         help="print the homes and the moves as JSON (implies --no-wait)")
    etcd_auth = sub.add_parser("etcd-auth", help="turn on etcd's access control: only node "
                               "and operator certificates may use the shard map")
    _etcd_args(etcd_auth)
    shard_of = sub.add_parser("shard-of", help="the shard each wallet id hashes to")
    shard_of.add_argument("wallets", nargs="+", metavar="WALLET")
    shard_of.add_argument("--shards", type=int, default=256)
    shard_of.add_argument("--json", action="store_true")
    journal = sub.add_parser("journal", help="writer epochs along each shard's journal; "
                             "exit 1 if one goes back")
    _store_args(journal)
    journal.add_argument("--shard", type=int, action="append", default=None,
                         help="only this shard (repeatable)")
    journal.add_argument("--json", action="store_true")
    fence = sub.add_parser("fence-check", help="prove an epoch is fenced: an empty append "
                           "with it must be refused (exit 0 if refused)")
    _store_args(fence)
    fence.add_argument("--shard", type=int, required=True)
    fence.add_argument("--epoch", type=int, required=True)
    fence.add_argument("--json", action="store_true")
    wallet = sub.add_parser("wallet", help="risk controls on a wallet, through a running ledger")
    wallet.add_argument("action", choices=["show", "freeze", "unfreeze", "limits",
                                           "confirm-device", "forget-device"])
    wallet.add_argument("wallet_id", nargs="?")
    wallet.add_argument("--default", action="store_true",
                        help="limits: the default of every wallet without its own")
    wallet.add_argument("--window", type=_limit_value, help="limits: the velocity window "
                        "(1h, 1d, ms; 'none'; 'default' follows the default)")
    wallet.add_argument("--max-amount", type=_limit_value,
                        help="limits: most money out per window (minor units; 'none')")
    wallet.add_argument("--max-count", type=_limit_value,
                        help="limits: most debits per window ('none')")
    wallet.add_argument("--step-up-above", type=_limit_value, help="limits: debits above this "
                        "need a confirmed device ('none'; 'default')")
    wallet.add_argument("--device", help="confirm-device / forget-device: the device id")
    wallet.add_argument("--reason", default="", help="journaled with the change")
    wallet.add_argument("--target", default="127.0.0.1:50051", help="a ledger node host:port")
    wallet.add_argument("--tls-dir", default=os.environ.get("LEDGER_TLS_DIR"),
                        help="ca.pem and the operator's certificate (mutual TLS)")
    wallet.add_argument("--tls-name", default="operator-ops")
    tail = sub.add_parser("tail", help="print the change stream: every committed journal "
                          "batch, in order per shard")
    tail.add_argument("--shard", type=int, action="append", default=[],
                      help="a shard to follow (repeat; default every shard)")
    tail.add_argument("--after", action="append", default=[], metavar="SHARD:SEQ",
                      help="resume a shard after this batch (repeat)")
    tail.add_argument("--follow", action="store_true", help="stay open for new batches")
    tail.add_argument("--json", action="store_true", help="JSON lines, one per batch")
    tail.add_argument("--target", default="127.0.0.1:50051", help="a ledger node host:port")
    tail.add_argument("--tls-dir", default=os.environ.get("LEDGER_TLS_DIR"),
                      help="ca.pem and a certificate allowed the stream (mutual TLS)")
    tail.add_argument("--tls-name", default="operator-ops")
    top_p = sub.add_parser("top", help="a live view of the cluster from the nodes' /metrics")
    top_p.add_argument("--metrics", action="append", default=[], metavar="URL",
                       help="a node's /metrics URL (repeat; default "
                            "http://127.0.0.1:9464/metrics, what make run serves)")
    top_p.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top_p.add_argument("--once", action="store_true",
                       help="print one frame (two scrapes --interval apart) and exit")
    certs_p = sub.add_parser("certs", help="a development CA and certificates (mutual TLS)")
    certs_p.add_argument("--dir", default="certs")
    certs_p.add_argument("--nodes", default="n1,n2,n3")
    certs_p.add_argument("--services", default="payments,envelopes,bench,chaos")
    certs_p.add_argument("--operators", default="ops")
    certs_p.add_argument("--force", action="store_true", help="replace an existing CA")
    commit_path = sub.add_parser("commit-path", help="consistency levels of the commit path")
    commit_path.add_argument("--json", action="store_true")
    envelope = sub.add_parser("envelope", help="red envelopes, as the journal has them")
    envelope_sub = envelope.add_subparsers(dest="action", required=True)
    show = envelope_sub.add_parser("show", help="an envelope, its grabs and their credits; "
                                   "exit 1 if it does not add up")
    show.add_argument("envelope_id")
    _store_args(show)
    show.add_argument("--json", action="store_true")
    audit = sub.add_parser("audit", help="the tamper-evident audit trail: verify the chains, "
                           "show records")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    verify = audit_sub.add_parser("verify", help="prove every shard's audit chain; exit 1 "
                                  "naming each problem")
    verify.add_argument("--expect", default=None, metavar="FILE",
                        help="a saved `audit verify --json`: its heads must still be in "
                             "the chains (catches a consistent rewrite)")
    audit_show = audit_sub.add_parser("show", help="audit records by wallet, principal or "
                                      "time")
    audit_show.add_argument("--wallet", default=None, help="debited or credited wallet")
    audit_show.add_argument("--principal", default=None, help="the caller that acted")
    audit_show.add_argument("--since", default=None,
                            help="from this time on (RFC 3339, or ms since the epoch)")
    audit_show.add_argument("--until", default=None, help="before this time (exclusive)")
    for p in (verify, audit_show):
        _store_args(p)
        p.add_argument("--shard", type=int, action="append", default=None,
                       help="only this shard (repeat for more)")
        p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Which flags were given explicitly: they win over a configuration file.
    args._given = {a.lstrip("-").split("=")[0].replace("-", "_")
                   for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    handlers = {"reconcile": _reconcile, "shards": _shards, "failover": _failover,
                "failback": _failback, "move-shard": _move_shard,
                "replication": _replication, "restore-homes": _restore_homes,
                "shard-of": _shard_of, "journal": _journal, "fence-check": _fence_check,
                "commit-path": _commit_path, "envelope": _envelope, "certs": _certs,
                "wallet": _wallet, "etcd-auth": _etcd_auth, "audit": _audit,
                "tail": _tail, "top": _top}
    try:
        return asyncio.run(handlers[args.command](args))
    except StoreError as exc:
        # The store could not be reached or is not a ledger: say so, without a traceback.
        print(f"ledgerctl {args.command}: {exc}", file=sys.stderr)
        return 2
    except EtcdOwnershipError as exc:
        # etcd unreachable, or it refused this certificate (or its absence).
        print(f"ledgerctl {args.command}: {exc} ({exc.__cause__!r})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
