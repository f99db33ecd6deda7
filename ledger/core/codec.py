"""Encoding of journal events, shard commands and snapshots as compact JSON.

The journal is the ledger's system of record, so its format is explicit and language neutral:
a dataclass becomes ``{"_": "<TypeName>", "f": [field values in declaration order]}``; tuples
and lists become arrays (decoded as tuples). ``FORMAT_VERSION`` changes whenever an existing
type's fields change; readers refuse journals of a newer version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import zlib
from typing import Any, Callable, Iterator

import orjson

from ledger.core import model, risk
from ledger.core.shard import ShardState

FORMAT_VERSION = 1

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (*model.EVENT_TYPES, *model.COMMAND_TYPES, model.Transfer, model.Credit,
                model.Wallet, model.Entry, model.IdempotencyRecord, model.Hold,
                model.Envelope, model.Grab,
                # Answers that cross nodes (GetWallet's risk view), never journaled.
                risk.RiskView, risk.Limits)
}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES.values()}


def _default(obj: Any) -> Any:
    names = _FIELDS.get(type(obj))
    if names is None:
        raise TypeError(f"cannot encode {type(obj).__name__}")
    return {"_": type(obj).__name__, "f": [getattr(obj, n) for n in names]}


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """A type's field values as a tuple, in one C call (``attrgetter`` of one name returns
    the bare value, hence the wrap)."""
    if not names:  # a command without fields (GetHead)
        return lambda obj: ()
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda obj: (one(obj),)
    return operator.attrgetter(*names)


_TAGGED = {cls: (cls.__name__, _tuple_getter(names)) for cls, names in _FIELDS.items()}


def _default_fast(obj: Any) -> Any:
    tagged = _TAGGED.get(type(obj))
    if tagged is None:
        raise TypeError(f"cannot encode {type(obj).__name__}")
    return {"_": tagged[0], "f": tagged[1](obj)}


# orjson writes exactly the JSON of ``json.dumps(..., separators=(",", ":"))`` for these
# values (except that it does not escape non-ASCII text, which every JSON reader decodes the
# same); dataclasses go through ``_default_fast`` so that they keep the tagged form.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS


def _hook(obj: dict) -> Any:
    tag = obj.get("_")
    if tag is None:
        return obj
    return _TYPES[tag](*obj["f"])


def _tuples(value: Any) -> Any:
    # JSON arrays decode as lists; the model uses tuples (immutable, hashable).
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for name in _FIELDS[type(value)]:
            item = getattr(value, name)
            if isinstance(item, list):
                object.__setattr__(value, name, _tuples(item))
    return value


def dumps(obj: Any) -> bytes:
    """Encode events, commands or a list of them.

    orjson (C) on the write path of every journal append: the standard library's encoder
    was ~7% of the ledger process's time in the embedded batch bench. A value orjson does
    not take (an integer beyond 64 bits, which no journaled amount can be) falls back to the
    standard encoder, same format.
    """
    try:
        return orjson.dumps(obj, default=_default_fast, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    return _tuples(json.loads(data, object_hook=_hook))


# --- snapshots -------------------------------------------------------------------------------
#
# A snapshot is the journaled part of a shard's state after some batch. Format 2 (written
# since snapshots are built off the event loop and stored in chunks):
#
#   b"LSNAP2\n" + zlib stream of newline-separated JSON lines:
#     {"format": 2, "shard": S, "seq": N}                       header
#     ["<section>", [record, record, ...]]                       at most RECORDS_PER_LINE each
#     ["end", {"<section>": count, ...}]                         trailer: counts per section
#
# A record is the list of a dataclass's field values in declaration order (no type tags), so
# it must change with the model exactly like the journal codec (FORMAT_VERSION). Sections come
# in a fixed order and records in the state's dict order, so the same state always gives the
# same bytes (deterministic: two builders of one snapshot write identical chunks). The
# trailer makes a cut-off snapshot fail loudly instead of loading as a smaller state. zlib
# (level 1) shrinks the JSON about 12x (100 k kept transfers: 42 MiB -> 3.5 MiB), which is
# what a snapshot costs in store writes and reads. Format 1 (one JSON object with type
# tags) is still read. Format 3 adds the section "spilled" (the filters of the keys that left
# memory, ``ledger.core.spilled``): same layout, so formats 2 and 3 load alike; a build that
# knows only 2 refuses a 3 (it would lose the filters) instead of misreading it. Format 4 adds
# the sections "envelopes" and "grabs" (red envelopes kept on the shard), for the same reason.
# Format 5 adds "grants" and "headroom" (headroom grants given and received). Format 6 adds
# "risk_default" and "risk" (risk limits, confirmed devices and velocity windows), and
# "audit": the audit chain's head ([[audit_seq, audit_head]], ``ledger.core.audit``); an older
# snapshot loads with an empty head (no rows were chained before it). Format 7 adds a third
# field to "audit": the latest shard map change recorded in the chain (``admin_change``).

SNAPSHOT_FORMAT = 7
_SNAPSHOT_MAGIC = b"LSNAP2\n"
# Records per JSON line: big enough that json does the work in C, small enough that encoding
# and decoding hand the GIL around often (they run in a worker thread next to the event loop).
SNAPSHOT_RECORDS_PER_LINE = 1000
# zlib level: 1 compresses JSON ~12x at ~4x the speed of the default level 6.
SNAPSHOT_ZLIB_LEVEL = 1
# Compressed bytes decompressed per step while loading (bounds the memory of a load to about
# one step's output plus the state being built).
_SNAPSHOT_READ_STEP = 256 * 1024

def _fields_getter(cls: type) -> Callable[[Any], tuple]:
    return _tuple_getter(_FIELDS[cls])


def _snapshot_records(state: ShardState) -> Iterator[tuple[str, list]]:
    wallet, transfer, record, hold, credit = (
        _fields_getter(model.Wallet), _fields_getter(model.Transfer),
        _fields_getter(model.IdempotencyRecord), _fields_getter(model.Hold),
        _fields_getter(model.Credit))
    yield "wallets", [wallet(w) for w in state.wallets.values()]
    yield "transfers", [transfer(t) for t in state.transfers.values()]
    yield "idempotency", [record(r) for r in state.idempotency.values()]
    yield "claims", [record(r) for r in state.claims.values()]
    yield "holds", [hold(h) for h in state.holds.values()]
    yield "outbox", [(dest, *credit(c)) for dest, items in state.outbox.items()
                     for c in items.values()]
    yield "outbox_last_seq", list(state.outbox_last_seq.items())
    yield "inbox_applied", list(state.inbox_applied.items())
    yield "chains", [(chain_id, committed, at) for chain_id, (committed, at)
                     in state.chains.items()]
    yield "reservations", [(tid, wallet_id, amount, at) for tid, (wallet_id, amount, at)
                           in state.reservations.items()]
    yield "fenced", [(tid, reserved_at, at) for tid, (reserved_at, at)
                     in state.fenced.items()]
    yield "chain_waiting", [(chain_id, sorted(shards)) for chain_id, shards
                            in state.chain_waiting.items()]
    yield "chains_purged_before", [state.chains_purged_before]
    yield "spilled", state.spilled.records()
    envelope, grab = _fields_getter(model.Envelope), _fields_getter(model.Grab)
    yield "envelopes", [envelope(e) for e in state.envelopes.values()]
    yield "grabs", [grab(g) for grabs in state.grabs.values() for g in grabs.values()]
    yield "grants", [(shard, total, state.grants_used.get(shard, 0))
                     for shard, total in state.grants_out.items()]
    yield "headroom", [(shard, total, state.headroom_used.get(shard, 0))
                       for shard, total in state.headroom_in.items()]
    d = state.risk_default
    yield "risk_default", ([] if d is risk.NO_LIMITS else
                           [(d.window_ms, d.max_amount_minor, d.max_count,
                             d.step_up_above_minor)])
    yield "risk", [r.record() for r in state.risk.values()]
    yield "audit", [(state.audit_seq, state.audit_head, state.admin_change)]


def snapshot_lines(state: ShardState) -> Iterator[bytes]:
    """The uncompressed lines of a format-2 snapshot of ``state``, one at a time."""
    dump = functools.partial(json.dumps, separators=(",", ":"))
    yield dump({"format": SNAPSHOT_FORMAT, "shard": state.shard, "seq": state.seq}).encode() \
        + b"\n"
    counts: dict[str, int] = {}
    for section, records in _snapshot_records(state):
        counts[section] = len(records)
        for i in range(0, len(records), SNAPSHOT_RECORDS_PER_LINE):
            yield dump([section, records[i:i + SNAPSHOT_RECORDS_PER_LINE]]).encode() + b"\n"
    yield dump(["end", counts]).encode() + b"\n"


def snapshot_dumps(state: ShardState) -> bytes:
    """Encode the journaled part of a shard's state (all of it but nothing in memory only).

    Deterministic: the same state gives the same bytes. CPU-heavy for big states (about
    1.2 s for 100 k kept transfers): run it off the event loop (``ledger.compaction``).
    """
    compressor = zlib.compressobj(SNAPSHOT_ZLIB_LEVEL)
    out = [_SNAPSHOT_MAGIC]
    for line in snapshot_lines(state):
        out.append(compressor.compress(line))
    out.append(compressor.flush())
    return b"".join(out)


def snapshot_loads(data: bytes | str) -> ShardState:
    """Decode a snapshot (format 2, or the older format 1).

    Raises:
        ValueError: not a snapshot, a newer format, or cut off / inconsistent.
    """
    if isinstance(data, str) or bytes(data[:1]) == b"{":
        return _snapshot_loads_v1(data)
    data = bytes(data)
    if not data.startswith(_SNAPSHOT_MAGIC):
        raise ValueError("not a ledger snapshot (unknown magic)")
    state: ShardState | None = None
    counts: dict[str, int] = {}
    ended = False
    for line in _snapshot_stream_lines(data):
        if ended:
            raise ValueError("snapshot has data after its trailer")
        if state is None:
            header = json.loads(line)
            if header.get("format", 0) > SNAPSHOT_FORMAT:
                raise ValueError(f"snapshot format {header.get('format')} is newer than "
                                 f"this build")
            state = ShardState(header["shard"])
            state.seq = header["seq"]
            continue
        section, records = json.loads(line)
        if section == "end":
            seen = {name: counts.get(name, 0) for name in records}
            if seen != records or set(counts) - set(records):
                raise ValueError(f"snapshot counts {counts} disagree with its trailer "
                                 f"{records}")
            ended = True
            continue
        _SECTION_LOADERS[section](state, records)
        counts[section] = counts.get(section, 0) + len(records)
    if state is None or not ended:
        raise ValueError("snapshot is cut off (no trailer)")
    return state


def _snapshot_stream_lines(data: bytes) -> Iterator[bytes]:
    """The lines of a format-2 snapshot, decompressed a step at a time."""
    decompressor = zlib.decompressobj()
    tail = b""
    try:
        for pos in range(len(_SNAPSHOT_MAGIC), len(data), _SNAPSHOT_READ_STEP):
            lines = (tail + decompressor.decompress(data[pos:pos + _SNAPSHOT_READ_STEP])
                     ).split(b"\n")
            tail = lines.pop()
            yield from lines
        lines = (tail + decompressor.flush()).split(b"\n")
    except zlib.error as exc:
        raise ValueError(f"snapshot is corrupt: {exc}") from exc
    if lines.pop() or not decompressor.eof:
        raise ValueError("snapshot is cut off (compressed stream incomplete)")
    yield from lines


def _load_wallets(state: ShardState, records: list) -> None:
    wallets = state.wallets
    for r in records:
        w = model.Wallet(*r)
        wallets[w.wallet_id] = w


def _load_transfers(state: ShardState, records: list) -> None:
    transfers = state.transfers
    for r in records:
        t = model.Transfer(*r)
        transfers[t.transfer_id] = t


def _records(records: list) -> Iterator[model.IdempotencyRecord]:
    # A fingerprint is a tuple of (field name, primitive value) pairs (ledger.core.shard).
    for caller, key, target, fingerprint, created_at_ms in records:
        yield model.IdempotencyRecord(caller, key, target, tuple(map(tuple, fingerprint)),
                                      created_at_ms)


def _load_idempotency(state: ShardState, records: list) -> None:
    for record in _records(records):
        state.idempotency[(record.caller, record.idempotency_key)] = record


def _load_claims(state: ShardState, records: list) -> None:
    for record in _records(records):
        state.claims[(record.caller, record.idempotency_key)] = record


def _load_holds(state: ShardState, records: list) -> None:
    for r in records:
        h = model.Hold(*r)
        state.holds[h.hold_id] = h


def _load_outbox(state: ShardState, records: list) -> None:
    for r in records:
        c = model.Credit(*r[1:])
        state.outbox.setdefault(r[0], {})[c.outbox_seq] = c


def _load_outbox_last_seq(state: ShardState, records: list) -> None:
    state.outbox_last_seq.update((dest, seq) for dest, seq in records)


def _load_inbox_applied(state: ShardState, records: list) -> None:
    state.inbox_applied.update((src, seq) for src, seq in records)


def _load_chains(state: ShardState, records: list) -> None:
    state.chains.update((chain_id, (committed, at)) for chain_id, committed, at in records)


def _load_reservations(state: ShardState, records: list) -> None:
    for tid, wallet_id, amount, at in records:
        state.reservations[tid] = (wallet_id, amount, at)
        state.incoming[wallet_id] = state.incoming.get(wallet_id, 0) + amount


def _load_fenced(state: ShardState, records: list) -> None:
    state.fenced.update((tid, (reserved_at, at)) for tid, reserved_at, at in records)


def _load_chain_waiting(state: ShardState, records: list) -> None:
    state.chain_waiting.update((chain_id, set(shards)) for chain_id, shards in records)


def _load_chains_purged_before(state: ShardState, records: list) -> None:
    state.chains_purged_before = max([state.chains_purged_before, *records])


def _load_envelopes(state: ShardState, records: list) -> None:
    for r in records:
        e = model.Envelope(*r)
        state.envelopes[e.envelope_id] = e


def _load_grabs(state: ShardState, records: list) -> None:
    for r in records:
        g = model.Grab(*r)
        state.grabs.setdefault(g.envelope_id, {})[g.receiver_wallet_id] = g


def _load_grants(state: ShardState, records: list) -> None:
    for shard, total, used in records:
        state.grants_out[shard] = total
        if used:
            state.grants_used[shard] = used
        state.granted_open += total - used


def _load_headroom(state: ShardState, records: list) -> None:
    for shard, total, used in records:
        state.headroom_in[shard] = total
        if used:
            state.headroom_used[shard] = used


def _load_risk_default(state: ShardState, records: list) -> None:
    for window, amount, count, step_up in records:
        state.risk_default = risk.Limits(window, amount, count, step_up)


def _load_risk(state: ShardState, records: list) -> None:
    for r in records:
        held = risk.WalletRisk.from_record(r)
        state.risk[held.wallet_id] = held


def _load_audit(state: ShardState, records: list) -> None:
    for audit_seq, audit_head, *admin_change in records:  # format 6: no admin_change
        state.audit_seq, state.audit_head = audit_seq, audit_head
        state.admin_change = admin_change[0] if admin_change else ""


_SECTION_LOADERS = {
    "wallets": _load_wallets, "transfers": _load_transfers, "idempotency": _load_idempotency,
    "claims": _load_claims, "holds": _load_holds, "outbox": _load_outbox,
    "outbox_last_seq": _load_outbox_last_seq, "inbox_applied": _load_inbox_applied,
    "chains": _load_chains, "reservations": _load_reservations, "fenced": _load_fenced,
    "chain_waiting": _load_chain_waiting, "chains_purged_before": _load_chains_purged_before,
    "spilled": lambda state, records: state.spilled.load_records(records),
    "envelopes": _load_envelopes, "grabs": _load_grabs, "grants": _load_grants,
    "headroom": _load_headroom, "risk_default": _load_risk_default, "risk": _load_risk,
    "audit": _load_audit,
}


def _snapshot_loads_v1(data: bytes | str) -> ShardState:
    """Format 1: one JSON object with type-tagged records (written before format 2)."""
    body = json.loads(data, object_hook=_hook)
    if body["v"] > FORMAT_VERSION:
        raise ValueError(f"snapshot format {body['v']} is newer than this build")
    state = ShardState(body["shard"])
    state.seq = body["seq"]
    state.wallets = {w.wallet_id: w for w in body["wallets"]}
    state.transfers = {t.transfer_id: t for t in body["transfers"]}
    for record in body["idempotency"]:
        record.fingerprint = _tuples(record.fingerprint)
        state.idempotency[(record.caller, record.idempotency_key)] = record
    state.outbox = {dest: {c.outbox_seq: c for c in items} for dest, items in body["outbox"]}
    state.outbox_last_seq = {dest: seq for dest, seq in body["outbox_last_seq"]}
    state.inbox_applied = {src: seq for src, seq in body["inbox_applied"]}
    state.holds = {h.hold_id: h for h in body["holds"]}
    for record in body.get("claims", ()):
        record.fingerprint = _tuples(record.fingerprint)
        state.claims[(record.caller, record.idempotency_key)] = record
    state.chains = {chain_id: (committed, at) for chain_id, committed, at in body["chains"]}
    return state
