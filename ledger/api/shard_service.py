"""The internal ``ShardOwnerService``: a node runs commands for the shards it owns, and the
matching client transport other nodes' routers use."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from ledger import constants as K
from ledger import tracing
from ledger.core import codec
from ledger.core.status import Outcome, Status
from ledger.runtime.requests import METADATA_KEY, REQUEST_ID
from ledgerpb import shard_pb2 as spb
from ledger.runtime.tasks import spawn
from ledger.security.tls import TlsFiles, channel_credentials
from ledgerpb import shard_pb2_grpc as spb_grpc
from shard_router.constants import TAKEOVER_WAIT_S_MAX
from shard_router.router import NotOwner

log = logging.getLogger("ledger.shard_service")

# How often outgoing node-to-node calls look at the node's certificate files for a rotation.
TLS_RELOAD_CHECK_S = 1.0


# The node-to-node channel takes messages as large as the servers do (gRPC's default receive
# limit is 4 MiB; an owner's answer to a full batch is several times that).
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", K.GRPC_MESSAGE_BYTES_MAX),
                   ("grpc.max_send_message_length", K.GRPC_MESSAGE_BYTES_MAX))


def _outcomes_dumps(outcomes: list[Outcome]) -> bytes:
    return codec.dumps([[int(o.status), o.field, o.detail, o.value, o.replayed]
                        for o in outcomes])


def _outcomes_loads(data: bytes) -> list[Outcome]:
    return [Outcome(Status(s), f, d, v, r) for s, f, d, v, r in codec.loads(data)]


class ShardOwnerServicer(spb_grpc.ShardOwnerServiceServicer):
    def __init__(self, node) -> None:
        self._node = node

    async def Execute(self, request, context):
        if request.codec_version != codec.FORMAT_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"codec_version {request.codec_version} is not "
                                f"{codec.FORMAT_VERSION}")
        # The calling node's deadline arrives as this call's gRPC deadline: the owner here
        # starts nothing after it either. A shard this node is taking over holds the call
        # until it serves (bounded), instead of sending the caller back to its retry loop.
        remaining_s = context.time_remaining()
        owner = await self._node.serving_owner(
            request.shard, TAKEOVER_WAIT_S_MAX if remaining_s is None
            else min(TAKEOVER_WAIT_S_MAX, remaining_s))
        if owner is None:
            info = self._node.ownership.owner(request.shard)
            return spb.ExecuteResponse(not_owner=True, owner_hint=info.address if info else "")
        commands = list(codec.loads(request.commands))
        remaining_s = context.time_remaining()
        deadline = (None if remaining_s is None
                    else asyncio.get_running_loop().time() + remaining_s)
        outcomes = await owner.submit_many(commands, request.wait_credit, deadline)
        return spb.ExecuteResponse(epoch=owner.epoch, outcomes=_outcomes_dumps(outcomes))


class GrpcShardTransport:
    """``RemoteTransport`` over gRPC, one channel per peer address.

    With ``tls`` (mutual TLS between nodes) the node's own certificate files are looked at
    again at most every ``TLS_RELOAD_CHECK_S``: when they changed (a rotation), new channels
    are made with the new files and the old ones are closed once the calls on them had
    their time (``SHARD_RPC_TIMEOUT_S``), so outgoing calls follow a rotation without a
    restart, as the serving side does (``ledger.security.tls.server_credentials``)."""

    def __init__(self, tls: TlsFiles | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stubs: dict[str, spb_grpc.ShardOwnerServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._tls = tls
        self._clock = clock
        self._credentials = channel_credentials(tls) if tls is not None else None
        self._stamp = tls.stamp() if tls is not None else ()
        self._checked = clock()

    def _reload_if_rotated(self) -> None:
        if self._tls is None or self._clock() - self._checked < TLS_RELOAD_CHECK_S:
            return
        self._checked = self._clock()
        try:
            stamp = self._tls.stamp()
            if stamp == self._stamp:
                return
            credentials = channel_credentials(self._tls)
        except OSError as exc:  # a rotation half done: keep the old files, look again later
            log.warning("node TLS files not reloaded for outgoing calls: %s", exc)
            return
        self._stamp, self._credentials = stamp, credentials
        retired, self._channels, self._stubs = self._channels, [], {}
        log.info("node TLS files reloaded for outgoing calls (%s)", self._tls.cert)
        for channel in retired:
            spawn(channel.close(grace=K.SHARD_RPC_TIMEOUT_S), "retire node channel")

    def _stub(self, address: str) -> spb_grpc.ShardOwnerServiceStub:
        self._reload_if_rotated()
        stub = self._stubs.get(address)
        if stub is None:
            channel = (grpc.aio.secure_channel(address, self._credentials, CHANNEL_OPTIONS)
                       if self._credentials
                       else grpc.aio.insecure_channel(address, CHANNEL_OPTIONS))
            self._channels.append(channel)
            stub = self._stubs[address] = spb_grpc.ShardOwnerServiceStub(channel)
        return stub

    async def execute(self, address: str, shard: int, commands: list,
                      wait_credit: bool, deadline: float | None = None) -> list[Outcome]:
        """Run commands on the node at ``address`` (``RemoteTransport``): the call's gRPC
        timeout is the time left before ``deadline`` (loop time), or SHARD_RPC_TIMEOUT_S."""
        request = spb.ExecuteRequest(shard=shard, codec_version=codec.FORMAT_VERSION,
                                     commands=codec.dumps(commands), wait_credit=wait_credit)
        timeout_s = (K.SHARD_RPC_TIMEOUT_S if deadline is None
                     else max(deadline - asyncio.get_running_loop().time(), 0.0))
        try:
            request_id = REQUEST_ID.get()
            with tracing.client_span("/ledger.v1.ShardOwnerService/Execute") as traced:
                metadata = [(METADATA_KEY, request_id)] if request_id else []
                response = await self._stub(address).Execute(
                    request, timeout=timeout_s, metadata=tuple(metadata + traced) or None)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                # A message above the limit fails the same way on every resend: say so loudly.
                log.error("shard %d at %s: %s (limit %d bytes, request %d bytes)", shard,
                          address, exc.details(), K.GRPC_MESSAGE_BYTES_MAX,
                          request.ByteSize())
            raise ConnectionError(f"{address}: {exc.code().name}") from exc
        if response.not_owner:
            raise NotOwner(response.owner_hint)
        return _outcomes_loads(response.outcomes)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
