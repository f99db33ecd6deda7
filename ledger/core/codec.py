"""Encoding of journal events, shard commands and snapshots as compact JSON.

The journal is the ledger's system of record, so its format is explicit and language neutral:
a dataclass becomes ``{"_": "<TypeName>", "f": [field values in declaration order]}``; tuples
and lists become arrays (decoded as tuples). ``FORMAT_VERSION`` changes whenever an existing
type's fields change; readers refuse journals of a newer version.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ledger.core import model
from ledger.core.shard import ShardState

FORMAT_VERSION = 1

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (*model.EVENT_TYPES, *model.COMMAND_TYPES, model.Transfer, model.Credit,
                model.Wallet, model.Entry, model.IdempotencyRecord, model.Hold)
}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES.values()}


def _default(obj: Any) -> Any:
    names = _FIELDS.get(type(obj))
    if names is None:
        raise TypeError(f"cannot encode {type(obj).__name__}")
    return {"_": type(obj).__name__, "f": [getattr(obj, n) for n in names]}


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
    """Encode events, commands or a list of them."""
    return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    return _tuples(json.loads(data, object_hook=_hook))


def snapshot_dumps(state: ShardState) -> bytes:
    """Encode the journaled part of a shard's state (reservations are not journaled)."""
    body = {
        "v": FORMAT_VERSION,
        "shard": state.shard,
        "seq": state.seq,
        "wallets": list(state.wallets.values()),
        "transfers": list(state.transfers.values()),
        "idempotency": list(state.idempotency.values()),
        "outbox": [[dest, list(items.values())] for dest, items in state.outbox.items()],
        "outbox_last_seq": list(state.outbox_last_seq.items()),
        "inbox_applied": list(state.inbox_applied.items()),
        "holds": list(state.holds.values()),
        "claims": list(state.claims.values()),
        "chains": [[chain_id, committed, at] for chain_id, (committed, at)
                   in state.chains.items()],
    }
    return json.dumps(body, default=_default, separators=(",", ":")).encode()


def snapshot_loads(data: bytes | str) -> ShardState:
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
