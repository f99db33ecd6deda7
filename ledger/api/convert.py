"""Conversions between domain dataclasses and ``ledger.v1`` messages (the API boundary)."""

from __future__ import annotations

from ledger.core.model import (
    KIND_DEPOSIT, KIND_TRANSFER, KIND_WITHDRAWAL, STATE_COMMITTED, Entry, Transfer, Wallet,
)
from ledger.ledgerpb import ledger_pb2 as pb

KIND_TO_PROTO = {
    KIND_TRANSFER: pb.TRANSFER_KIND_TRANSFER,
    KIND_DEPOSIT: pb.TRANSFER_KIND_DEPOSIT,
    KIND_WITHDRAWAL: pb.TRANSFER_KIND_WITHDRAWAL,
}


def wallet_to_proto(w: Wallet, shard: int) -> pb.Wallet:
    return pb.Wallet(wallet_id=w.wallet_id, currency=w.currency, balance_minor=w.balance_minor,
                     held_minor=w.held_minor, available_minor=w.available_minor,
                     version=w.version, allow_negative=w.allow_negative, frozen=w.frozen,
                     created_at_ms=w.created_at_ms, shard=shard)


def transfer_to_proto(t: Transfer) -> pb.Transfer:
    return pb.Transfer(
        transfer_id=t.transfer_id, kind=KIND_TO_PROTO[t.kind], from_wallet_id=t.from_wallet_id,
        to_wallet_id=t.to_wallet_id, amount_minor=t.amount_minor, currency=t.currency,
        memo=t.memo,
        state=(pb.TRANSFER_STATE_COMMITTED if t.state == STATE_COMMITTED
               else pb.TRANSFER_STATE_REFUSED),
        status=t.status, status_field=t.status_field, status_detail=t.status_detail,
        credited=t.credited, created_at_ms=t.created_at_ms, idempotency_key=t.idempotency_key)


def entry_to_proto(e: Entry) -> pb.Entry:
    return pb.Entry(wallet_id=e.wallet_id, version=e.version, transfer_id=e.transfer_id,
                    kind=KIND_TO_PROTO[e.kind], amount_minor=e.amount_minor,
                    balance_after_minor=e.balance_after_minor,
                    counterparty_wallet_id=e.counterparty_wallet_id, currency=e.currency,
                    at_ms=e.at_ms)
