"""Conversions between domain dataclasses and ``ledger.v1`` messages (the API boundary)."""

from __future__ import annotations

from ledger.core import split
from ledger.core.risk import RiskView
from ledger.core.model import (
    ENVELOPE_ACTIVE, ENVELOPE_EXPIRED, ENVELOPE_FUNDING, ENVELOPE_REFUNDED, ENVELOPE_UNFUNDED, ENVELOPE_SOLD_OUT,
    HOLD_CAPTURED, HOLD_EXPIRED, HOLD_HELD, HOLD_RELEASED, KIND_DEPOSIT, KIND_ENVELOPE_FUND,
    KIND_ENVELOPE_GRAB, KIND_ENVELOPE_REFUND, KIND_HOLD_CAPTURE, KIND_TRANSFER, KIND_WITHDRAWAL,
    STATE_COMMITTED, STATE_PENDING, STATE_REFUSED, Entry, Envelope, Grab, Hold, Transfer, Wallet,
    escrow_wallet_id,
)
from ledgerpb import ledger_pb2 as pb

KIND_TO_PROTO = {
    KIND_TRANSFER: pb.TRANSFER_KIND_TRANSFER,
    KIND_DEPOSIT: pb.TRANSFER_KIND_DEPOSIT,
    KIND_WITHDRAWAL: pb.TRANSFER_KIND_WITHDRAWAL,
    KIND_HOLD_CAPTURE: pb.TRANSFER_KIND_HOLD_CAPTURE,
    KIND_ENVELOPE_FUND: pb.TRANSFER_KIND_ENVELOPE_FUND,
    KIND_ENVELOPE_GRAB: pb.TRANSFER_KIND_ENVELOPE_GRAB,
    KIND_ENVELOPE_REFUND: pb.TRANSFER_KIND_ENVELOPE_REFUND,
}
STATE_TO_PROTO = {
    STATE_COMMITTED: pb.TRANSFER_STATE_COMMITTED,
    STATE_REFUSED: pb.TRANSFER_STATE_REFUSED,
    STATE_PENDING: pb.TRANSFER_STATE_PENDING,
}
HOLD_STATE_TO_PROTO = {
    HOLD_HELD: pb.HOLD_STATE_HELD,
    HOLD_CAPTURED: pb.HOLD_STATE_CAPTURED,
    HOLD_RELEASED: pb.HOLD_STATE_RELEASED,
    HOLD_EXPIRED: pb.HOLD_STATE_EXPIRED,
}
ENVELOPE_KIND_TO_PROTO = {
    split.KIND_FIXED: pb.ENVELOPE_KIND_FIXED,
    split.KIND_LUCKY: pb.ENVELOPE_KIND_LUCKY,
    split.KIND_EXCLUSIVE: pb.ENVELOPE_KIND_EXCLUSIVE,
}
ENVELOPE_KIND_FROM_PROTO: dict[int, str] = {v: k for k, v in ENVELOPE_KIND_TO_PROTO.items()}
ENVELOPE_STATE_TO_PROTO = {
    ENVELOPE_FUNDING: pb.ENVELOPE_STATE_FUNDING,
    ENVELOPE_ACTIVE: pb.ENVELOPE_STATE_ACTIVE,
    ENVELOPE_SOLD_OUT: pb.ENVELOPE_STATE_SOLD_OUT,
    ENVELOPE_EXPIRED: pb.ENVELOPE_STATE_EXPIRED,
    ENVELOPE_REFUNDED: pb.ENVELOPE_STATE_REFUNDED,
    ENVELOPE_UNFUNDED: pb.ENVELOPE_STATE_UNFUNDED,
}


def wallet_to_proto(w: Wallet, shard: int, risk: RiskView | None = None) -> pb.Wallet:
    return pb.Wallet(wallet_id=w.wallet_id, currency=w.currency, balance_minor=w.balance_minor,
                     held_minor=w.held_minor, available_minor=w.available_minor,
                     version=w.version, allow_negative=w.allow_negative, frozen=w.frozen,
                     created_at_ms=w.created_at_ms, shard=shard,
                     risk=risk_to_proto(risk) if risk is not None else None)


def risk_to_proto(r: RiskView) -> pb.WalletRisk:
    return pb.WalletRisk(window_ms=r.limits.window_ms,
                         max_amount_minor=r.limits.max_amount_minor,
                         max_count=r.limits.max_count, velocity_own=r.velocity_own,
                         used_amount_minor=r.used_amount_minor, used_count=r.used_count,
                         step_up_above_minor=r.limits.step_up_above_minor,
                         step_up_own=r.step_up_own, devices=list(r.devices))


def transfer_to_proto(t: Transfer) -> pb.Transfer:
    return pb.Transfer(
        transfer_id=t.transfer_id, kind=KIND_TO_PROTO[t.kind], from_wallet_id=t.from_wallet_id,
        to_wallet_id=t.to_wallet_id, amount_minor=t.amount_minor, currency=t.currency,
        memo=t.memo,
        state=STATE_TO_PROTO[t.state],
        # protobuf takes the enum's int value; the generated .pyi lists only the enum type.
        status=t.status,  # type: ignore[arg-type]
        status_field=t.status_field, status_detail=t.status_detail,
        credited=t.credited, created_at_ms=t.created_at_ms, idempotency_key=t.idempotency_key)


def entry_to_proto(e: Entry) -> pb.Entry:
    return pb.Entry(wallet_id=e.wallet_id, version=e.version, transfer_id=e.transfer_id,
                    kind=KIND_TO_PROTO[e.kind], amount_minor=e.amount_minor,
                    balance_after_minor=e.balance_after_minor,
                    counterparty_wallet_id=e.counterparty_wallet_id, currency=e.currency,
                    at_ms=e.at_ms)


def hold_to_proto(h: Hold) -> pb.Hold:
    return pb.Hold(hold_id=h.hold_id, wallet_id=h.wallet_id, amount_minor=h.amount_minor,
                   currency=h.currency, state=HOLD_STATE_TO_PROTO[h.state],
                   captured_minor=h.captured_minor, created_at_ms=h.created_at_ms,
                   expires_at_ms=h.expires_at_ms, closed_at_ms=h.closed_at_ms)


def envelope_kind_from_proto(kind: int) -> str:
    """The core's kind of an ``EnvelopeKind``; "" for UNSPECIFIED or a value this server does
    not know (the coordinator refuses it, naming the field ``kind``)."""
    return ENVELOPE_KIND_FROM_PROTO.get(kind, "")


def envelope_to_proto(e: Envelope, now_ms: int) -> pb.Envelope:
    """An envelope as of ``now_ms`` (its state depends on the time: ACTIVE turns EXPIRED)."""
    return pb.Envelope(
        envelope_id=e.envelope_id, sender_wallet_id=e.sender_wallet_id, currency=e.currency,
        kind=ENVELOPE_KIND_TO_PROTO[e.kind], total_minor=e.total_minor, shares=e.shares,
        receiver_wallet_id=e.receiver_wallet_id, memo=e.memo,
        state=ENVELOPE_STATE_TO_PROTO[e.state(now_ms)], shares_left=e.left_shares,
        amount_left_minor=e.left_minor, refunded_minor=e.refunded_minor,
        created_at_ms=e.created_at_ms, expires_at_ms=e.expires_at_ms,
        funded_at_ms=e.funded_at_ms, closed_at_ms=e.closed_at_ms,
        funding_transfer_id=e.funding_transfer_id, refund_transfer_id=e.refund_transfer_id,
        escrow_wallet_id=escrow_wallet_id(e.envelope_id), min_share_minor=e.min_share_minor)


def grab_to_proto(g: Grab) -> pb.Grab:
    return pb.Grab(envelope_id=g.envelope_id, position=g.position,
                   receiver_wallet_id=g.receiver_wallet_id, amount_minor=g.amount_minor,
                   transfer_id=g.transfer_id, at_ms=g.at_ms)
