"""Typed asyncio client of ``ledger.v1.LedgerService`` and ``ledger.v1.RedEnvelopeService``.

Every call has a deadline. Mutating calls take an idempotency key (one is made when not
given) and are retried with the SAME key on transient outcomes only (UNAVAILABLE, ABORTED,
RESOURCE_EXHAUSTED, and DEADLINE_EXCEEDED, which may hide a success): a retry can never move
money twice, and the answer after a retry is the ledger's original result.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Iterable, Mapping, Self

import grpc
from tenacity import (
    AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay,
    wait_exponential_jitter,
)

from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc
from redledger_client.constants import (
    DEFAULT_TIMEOUT_S, GRPC_MESSAGE_BYTES_MAX, RETRY_ATTEMPTS_MAX, RETRY_BACKOFF_S_FIRST,
    RETRY_BACKOFF_S_MAX, RETRY_JITTER_S_MAX, RETRY_TOTAL_S_MAX, REQUEST_ID_METADATA,
)

# Codes a call is retried on, with the same request (and so the same idempotency key).
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED})


def new_idempotency_key() -> str:
    """A fresh, random idempotency key (32 hex characters, well under the 128-byte limit)."""
    return uuid.uuid4().hex


class LedgerError(Exception):
    """A call that did not succeed: the gRPC code, the ledger's ResultStatus name, the field.

    Catch the subclasses to tell what it means for the request:

    * ``LedgerRefused``: the ledger answered and refused (bad input, insufficient funds, key
      reused with another payload, ...). The answer is final: retrying the same request
      gives the same refusal (a state refusal is recorded under the idempotency key).
    * ``LedgerOutcomeUnknown``: a money movement (or other mutating call) got only transient
      answers (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED) until
      the retries ran out, or an internal error (INTERNAL, UNKNOWN; not retried). It may or
      may not have been executed. Send it again with the same ``idempotency_key`` (within
      the retention window) to learn its outcome; never with a new key, which could execute
      it twice.
    * ``LedgerUnavailable``: a read got only transient answers (or an internal error);
      nothing was changed.

    Attributes:
        code: The gRPC status code of the last answer.
        status: The ``ResultStatus`` name (``RESULT_STATUS_INSUFFICIENT_FUNDS``), or "" when
            the call was not answered by the ledger's rules (a store outage, a deadline).
        field: The request field the refusal is about ("" when none).
        message: The answer's message, written for callers.
        error_id: The ledger's reference of a failure it logged (quote it to the operators
            of the ledger), or "" when there is none.
    """

    def __init__(self, code: grpc.StatusCode, status: str, field: str, message: str,
                 error_id: str = "") -> None:
        super().__init__(f"{code.name} {status} {message}")
        self.code = code
        self.status = status
        self.field = field
        self.message = message
        self.error_id = error_id

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> Self:
        """The error of a failed call, read from its code, message and trailers."""
        trailers = dict(exc.trailing_metadata() or ())
        return cls(exc.code(), trailers.get("ledger-status", ""),
                   trailers.get("ledger-field", ""), exc.details() or "",
                   trailers.get("ledger-error-id", ""))


class LedgerRefused(LedgerError):
    """The ledger refused the request; the refusal is final (see ``LedgerError``)."""


class LedgerOutcomeUnknown(LedgerError):
    """A mutating call whose outcome is unknown: retry with the same idempotency key."""

    idempotency_key: str = ""
    attempts: int = 0


class LedgerUnavailable(LedgerError):
    """A read that got only transient answers (or an internal error); nothing was changed."""


# Codes that say "not answered (yet)" rather than "refused". CANCELLED and DEADLINE_EXCEEDED
# may hide a request that ran; so may INTERNAL (the ledger failed on a bug, maybe after the
# request's commit) and UNKNOWN (an answer from something other than the ledger's own
# handling). Those two are not retried: sending again cannot help a bug.
UNKNOWN_OUTCOME_CODES = TRANSIENT_CODES | {grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                                           grpc.StatusCode.UNKNOWN}


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT_CODES


# The item lists of the batch calls (BatchTransfer, GrabEnvelopes): each item carries its key.
_BATCH_FIELDS = ("transfers", "grabs")


def _error(exc: grpc.aio.AioRpcError, request: Any, attempts: int) -> LedgerError:
    key = getattr(request, "idempotency_key", "")
    if exc.code() not in UNKNOWN_OUTCOME_CODES:
        return LedgerRefused.from_rpc(exc)
    if not key and not any(getattr(request, name, None) for name in _BATCH_FIELDS):
        return LedgerUnavailable.from_rpc(exc)
    error = LedgerOutcomeUnknown.from_rpc(exc)
    error.idempotency_key = key
    error.attempts = attempts
    return error


def _enum(enum: Any, prefix: str, value: int | str) -> int:
    """An enum value given as itself, by its full name or by its short name ("LUCKY")."""
    if isinstance(value, str):
        return enum.Value(value if value.startswith(prefix) else prefix + value.upper())
    return value


def mutual_tls(ca_pem: str, cert_pem: str, key_pem: str) -> grpc.ChannelCredentials:
    """Channel credentials for a ledger with mutual TLS, from PEM file paths (``ledgerctl
    certs`` writes ``ca.pem`` and ``service-<name>.pem``/``.key``). The server then names the
    caller by its certificate; ``caller`` is ignored."""
    with open(ca_pem, "rb") as ca, open(cert_pem, "rb") as cert, open(key_pem, "rb") as key:
        return grpc.ssl_channel_credentials(root_certificates=ca.read(),
                                            private_key=key.read(),
                                            certificate_chain=cert.read())


class LedgerClient:
    """An asyncio client of one ledger endpoint; use it as an async context manager.

    Args:
        target: ``host:port`` of a ledger node (``localhost:50051`` for ``ledgerd dev``).
        caller: The caller name idempotency keys are scoped to (metadata ``ledger-caller``).
        timeout_s: The deadline of each attempt of a call, in seconds.
        retries: Retry transient answers with the same request (and key); False sends once.
        credentials: Channel credentials for TLS (``mutual_tls(ca, cert, key)``); None for a
            plaintext channel.

    Every call raises a ``LedgerError`` subclass when it does not succeed.
    """

    def __init__(self, target: str, caller: str = "anonymous",
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: bool = True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
                   ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX)]
        self._channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                         else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.LedgerServiceStub(self._channel)
        self._envelopes = pb_grpc.RedEnvelopeServiceStub(self._channel)
        self._metadata = (("ledger-caller", caller),)
        self._timeout_s = timeout_s
        self._retries = retries

    async def __aenter__(self) -> "LedgerClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, retry: bool):
        attempts = 0

        # One request id per logical call, the same on its retries: the ledger's logs on
        # every node that handles it carry it (``ledger-request-id``).
        metadata = self._metadata + ((REQUEST_ID_METADATA, uuid.uuid4().hex[:16]),)

        async def once():
            nonlocal attempts
            attempts += 1
            return await method(request, timeout=self._timeout_s, metadata=metadata)
        try:
            if not (retry and self._retries):
                return await once()
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_transient), reraise=True,
                    stop=stop_after_attempt(RETRY_ATTEMPTS_MAX) | stop_after_delay(
                        RETRY_TOTAL_S_MAX),
                    wait=wait_exponential_jitter(multiplier=RETRY_BACKOFF_S_FIRST,
                                                 jitter=RETRY_JITTER_S_MAX,
                                                 max=RETRY_BACKOFF_S_MAX)):
                with attempt:
                    return await once()
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, request, attempts) from None

    # --- wallets ----------------------------------------------------------------------------

    async def create_wallet(self, wallet_id: str, currency: str, allow_negative: bool = False,
                            idempotency_key: str | None = None) -> pb.CreateWalletResponse:
        request = pb.CreateWalletRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                         wallet_id=wallet_id, currency=currency,
                                         allow_negative=allow_negative)
        return await self._call(self._stub.CreateWallet, request, retry=True)

    async def get_wallet(self, wallet_id: str) -> pb.Wallet:
        response = await self._call(self._stub.GetWallet, pb.GetWalletRequest(wallet_id=wallet_id),
                                    retry=True)
        return response.wallet

    async def set_wallet_frozen(self, wallet_id: str, frozen: bool,
                                reason: str = "") -> pb.Wallet:
        """Freeze (or unfreeze) a wallet: a frozen wallet refuses debits (``WALLET_FROZEN``).
        Setting the state it has changes nothing, so a retry is safe."""
        response = await self._call(self._stub.SetWalletFrozen, pb.SetWalletFrozenRequest(
            wallet_id=wallet_id, frozen=frozen, reason=reason), retry=True)
        return response.wallet

    async def set_risk_limits(self, wallet_id: str = "", window_ms: int = 0,
                              max_amount_minor: int = 0, max_count: int = 0,
                              step_up_above_minor: int = 0,
                              reason: str = "") -> pb.SetRiskLimitsResponse:
        """Set a wallet's velocity limit and step-up threshold, or (``wallet_id`` empty) the
        default of every wallet without its own. ``window_ms`` / ``step_up_above_minor`` -1
        makes a wallet follow the default; 0 means no limit. Setting what is in force changes
        nothing, so a retry is safe."""
        return await self._call(self._stub.SetRiskLimits, pb.SetRiskLimitsRequest(
            wallet_id=wallet_id, window_ms=window_ms, max_amount_minor=max_amount_minor,
            max_count=max_count, step_up_above_minor=step_up_above_minor, reason=reason),
            retry=True)

    async def confirm_device(self, wallet_id: str, device_id: str, forget: bool = False,
                             reason: str = "") -> pb.Wallet:
        """Confirm a device of a wallet after a second check (or forget it): debits above the
        step-up threshold pass only from confirmed devices. Idempotent."""
        response = await self._call(self._stub.ConfirmDevice, pb.ConfirmDeviceRequest(
            wallet_id=wallet_id, device_id=device_id, forget=forget, reason=reason), retry=True)
        return response.wallet

    # --- money ------------------------------------------------------------------------------

    async def deposit(self, wallet_id: str, amount_minor: int, currency: str, memo: str = "",
                      idempotency_key: str | None = None) -> pb.TransferResponse:
        request = pb.DepositRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                    wallet_id=wallet_id, amount_minor=amount_minor,
                                    currency=currency, memo=memo)
        return await self._call(self._stub.Deposit, request, retry=True)

    async def withdraw(self, wallet_id: str, amount_minor: int, currency: str, memo: str = "",
                       idempotency_key: str | None = None,
                       device_id: str = "") -> pb.TransferResponse:
        request = pb.WithdrawRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                     wallet_id=wallet_id, amount_minor=amount_minor,
                                     currency=currency, memo=memo, device_id=device_id)
        return await self._call(self._stub.Withdraw, request, retry=True)

    async def transfer(self, from_wallet_id: str, to_wallet_id: str, amount_minor: int,
                       currency: str, memo: str = "",
                       idempotency_key: str | None = None,
                       device_id: str = "") -> pb.TransferResponse:
        """Move money; ``device_id`` names the payer's device (the step-up check)."""
        request = pb.TransferRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                     from_wallet_id=from_wallet_id, to_wallet_id=to_wallet_id,
                                     amount_minor=amount_minor, currency=currency, memo=memo,
                                     device_id=device_id)
        return await self._call(self._stub.Transfer, request, retry=True)

    async def batch_transfer(self, transfers: list[pb.TransferRequest]
                             ) -> pb.BatchTransferResponse:
        """One result per item. Items with transient results are NOT retried here: the
        caller resends those items (same keys) if it wants to."""
        for item in transfers:
            if not item.idempotency_key:
                item.idempotency_key = new_idempotency_key()
        return await self._call(self._stub.BatchTransfer,
                                pb.BatchTransferRequest(transfers=transfers), retry=True)

    async def create_hold(self, wallet_id: str, amount_minor: int, currency: str, timeout_ms: int,
                          idempotency_key: str | None = None,
                          device_id: str = "") -> pb.HoldResponse:
        request = pb.CreateHoldRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                       wallet_id=wallet_id, amount_minor=amount_minor,
                                       currency=currency, timeout_ms=timeout_ms,
                                       device_id=device_id)
        return await self._call(self._stub.CreateHold, request, retry=True)

    async def capture_hold(self, hold_id: str, to_wallet_id: str, amount_minor: int = 0,
                           memo: str = "", idempotency_key: str | None = None
                           ) -> pb.TransferResponse:
        request = pb.CaptureHoldRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                        hold_id=hold_id, amount_minor=amount_minor,
                                        to_wallet_id=to_wallet_id, memo=memo)
        return await self._call(self._stub.CaptureHold, request, retry=True)

    async def release_hold(self, hold_id: str, idempotency_key: str | None = None
                           ) -> pb.HoldResponse:
        request = pb.ReleaseHoldRequest(idempotency_key=idempotency_key or new_idempotency_key(),
                                        hold_id=hold_id)
        return await self._call(self._stub.ReleaseHold, request, retry=True)

    async def get_hold(self, hold_id: str) -> pb.Hold:
        response = await self._call(self._stub.GetHold, pb.GetHoldRequest(hold_id=hold_id),
                                    retry=True)
        return response.hold

    async def get_transfer(self, transfer_id: str) -> pb.Transfer:
        response = await self._call(self._stub.GetTransfer,
                                    pb.GetTransferRequest(transfer_id=transfer_id), retry=True)
        return response.transfer

    async def list_entries(self, wallet_id: str, page_size: int = 100,
                           page_token: str = "") -> pb.ListWalletEntriesResponse:
        return await self._call(self._stub.ListWalletEntries, pb.ListWalletEntriesRequest(
            wallet_id=wallet_id, page_size=page_size, page_token=page_token), retry=True)

    async def all_entries(self, wallet_id: str, page_size: int = 1000) -> list[pb.Entry]:
        entries, token = [], ""
        while True:
            page = await self.list_entries(wallet_id, page_size, token)
            entries.extend(page.entries)
            token = page.next_page_token
            if not token:
                return entries

    async def balance_at(self, wallet_id: str, *, version: int = 0,
                         at_ms: int = 0) -> pb.GetBalanceAtResponse:
        """The wallet's balance after its entry ``version``, or as of ``at_ms`` (give one)."""
        return await self._call(self._stub.GetBalanceAt, pb.GetBalanceAtRequest(
            wallet_id=wallet_id, version=version, at_ms=at_ms), retry=True)

    async def watch_changes(self, shards: Iterable[int] = (),
                            positions: Mapping[int, int] | None = None,
                            follow: bool = False) -> AsyncIterator[pb.ChangeBatch]:
        """Committed journal batches of ``shards`` (all if empty) after ``positions`` (shard
        -> last seq seen), in order per shard; with ``follow`` the stream stays open. Not
        retried here: on an error, call again with the last seq seen per shard."""
        request = pb.WatchChangesRequest(
            shards=list(shards), follow=follow,
            positions=[pb.ShardPosition(shard=s, after_seq=q)
                       for s, q in sorted((positions or {}).items())])
        call = self._stub.WatchChanges(request, metadata=self._metadata + (
                                           (REQUEST_ID_METADATA, uuid.uuid4().hex[:16]),),
                                       timeout=None if follow else self._timeout_s)
        try:
            async for batch in call:
                yield batch
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, request, 1) from None
        finally:
            call.cancel()

    # --- red envelopes ----------------------------------------------------------------------

    async def create_envelope(self, sender_wallet_id: str, total_minor: int, shares: int,
                              kind: pb.EnvelopeKind | str, currency: str, expiry_ms: int = 0,
                              memo: str = "", receiver_wallet_id: str = "",
                              idempotency_key: str | None = None, device_id: str = ""
                              ) -> pb.CreateEnvelopeResponse:
        """Put ``total_minor`` of the sender's money into a new envelope of ``shares`` shares.

        Args:
            kind: ``"FIXED"``, ``"LUCKY"`` or ``"EXCLUSIVE"`` (or ``pb.ENVELOPE_KIND_*``).
            expiry_ms: How long it stays open; 0 is the server's longest (24 h by default).
                What is not grabbed by then goes back to the sender.
            receiver_wallet_id: EXCLUSIVE only: the one wallet that may grab it.
        """
        request = pb.CreateEnvelopeRequest(
            idempotency_key=idempotency_key or new_idempotency_key(),
            sender_wallet_id=sender_wallet_id, total_minor=total_minor, shares=shares,
            kind=_enum(pb.EnvelopeKind, "ENVELOPE_KIND_", kind),  # type: ignore[arg-type]
            currency=currency, expiry_ms=expiry_ms, memo=memo,
            receiver_wallet_id=receiver_wallet_id, device_id=device_id)
        return await self._call(self._envelopes.CreateEnvelope, request, retry=True)

    async def grab_envelope(self, envelope_id: str, receiver_wallet_id: str,
                            idempotency_key: str | None = None) -> pb.GrabEnvelopeResponse:
        """Take one share for ``receiver_wallet_id``: the answer says how much; the credit
        follows (``credited`` says whether it landed already; ``get_transfer`` on
        ``grab.transfer_id`` follows it). A key is scoped to its envelope."""
        request = pb.GrabEnvelopeRequest(
            idempotency_key=idempotency_key or new_idempotency_key(), envelope_id=envelope_id,
            receiver_wallet_id=receiver_wallet_id)
        return await self._call(self._envelopes.GrabEnvelope, request, retry=True)

    async def grab_envelopes(self, grabs: list[pb.GrabEnvelopeRequest]
                             ) -> pb.GrabEnvelopesResponse:
        """One result per item. Items with transient results are NOT retried here: the
        caller resends those items (same keys) if it wants to."""
        for item in grabs:
            if not item.idempotency_key:
                item.idempotency_key = new_idempotency_key()
        return await self._call(self._envelopes.GrabEnvelopes,
                                pb.GrabEnvelopesRequest(grabs=grabs), retry=True)

    async def get_envelope(self, envelope_id: str, page_size: int = 100,
                           page_token: str = "") -> pb.GetEnvelopeResponse:
        """The envelope, a page of its grabs (in grab order) and its luckiest grab."""
        return await self._call(self._envelopes.GetEnvelope, pb.GetEnvelopeRequest(
            envelope_id=envelope_id, page_size=page_size, page_token=page_token), retry=True)

    async def list_envelopes(self, wallet_id: str, role: pb.EnvelopeRole | str,
                             page_size: int = 100, page_token: str = ""
                             ) -> pb.ListEnvelopesResponse:
        """Envelopes the wallet sent (role ``"SENT"``: ``envelopes``) or shares it grabbed
        (``"RECEIVED"``: ``grabs``), oldest first. Read from the ledger's views, which follow
        its journal by a short delay."""
        return await self._call(self._envelopes.ListEnvelopes, pb.ListEnvelopesRequest(
            wallet_id=wallet_id,
            role=_enum(pb.EnvelopeRole, "ENVELOPE_ROLE_", role),  # type: ignore[arg-type]
            page_size=page_size, page_token=page_token), retry=True)
