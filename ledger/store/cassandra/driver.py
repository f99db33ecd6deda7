"""The driver bridge: cassandra-driver's callbacks to asyncio, statement options, driver errors.

Driver I/O runs on cassandra-driver's own event-loop thread; results reach asyncio through
``loop.call_soon_threadsafe`` from the driver's callbacks, so no call blocks the event loop and
no thread is spent per call. Every statement is prepared here with its consistency, serial
consistency and idempotence stated (``Driver.prepare``), and the retry policy never re-sends a
statement that is not idempotent (a CAS): the journal resolves such outcomes itself.

What this module decides about errors: ``DRIVER_ERRORS`` are the driver's "did not (or may
not) complete" errors, which the journal and views translate into the port's errors;
``connection_busy`` (not sent: safe to send again, even a CAS) and ``never_sent`` (no node
received it: a CAS cannot have been proposed).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import threading
from typing import Any, Iterator, Sequence

from cassandra import ConsistencyLevel, OperationTimedOut, RequestExecutionException
from cassandra import protocol as cql_protocol
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionBusy, ConnectionException
from cassandra.pool import NoConnectionsAvailable
from cassandra.policies import (ConstantReconnectionPolicy, ConstantSpeculativeExecutionPolicy,
                                DCAwareRoundRobinPolicy, RetryPolicy, TokenAwarePolicy)
from cassandra.query import PreparedStatement, Statement, dict_factory

from ledger import metrics
from ledger.store.bridge import settle as _settle
from ledger.store.cassandra.constants import (HEDGE_DELAY_S, HEDGE_EXTRA_MAX,
                                               RECONNECT_DELAY_S, ROWS_IN_FLIGHT_MAX)
from ledger.store.port import StoreUnavailable

# Driver errors that say "the request did not (or may not) complete": coordinator-side
# timeouts, failures and overload (typed or raw protocol messages), client-side deadlines,
# broken connections. Validation errors (InvalidRequest, ...) are bugs and are not caught.
DRIVER_ERRORS = (NoHostAvailable, RequestExecutionException, OperationTimedOut,
                 ConnectionException, OSError, cql_protocol.RequestExecutionException,
                 cql_protocol.ServerError)


def consistency(value: int | str) -> int:
    """Accept ``ConsistencyLevel.QUORUM`` or its name (``"QUORUM"``), as configuration does."""
    if isinstance(value, str):
        return ConsistencyLevel.name_to_value[value.upper()]
    return value


# The execution profile of hedged statements (``hedged``): the default one, plus speculative
# sends to the next nodes of the query plan, which are the other regions' nodes.
PROFILE_HEDGED = "hedged"
_hedged: contextvars.ContextVar[bool] = contextvars.ContextVar("hedged", default=False)


@contextlib.contextmanager
def hedged() -> Iterator[None]:
    """Within it (this task and the tasks it starts), idempotent statements are hedged: sent
    again to a node of another region after ``HEDGE_DELAY_S`` without an answer, and the first
    answer wins (the driver's speculative execution).

    For a takeover's and a warm-up's reads and fence, which a node of the local region that
    has just come back (and lacks what was written meanwhile) answered only after 10 s and
    more, while no node served the shard. Not for the commit path: an append is never sent
    twice by the driver (``NoBlindRetryPolicy``), and hedging reads under load would add load
    when the cluster is slowest.
    """
    token = _hedged.set(True)
    try:
        yield
    finally:
        _hedged.reset(token)


def new_cluster(contact_points: Sequence[str], port: int, local_dc: str,
                request_timeout_s: float) -> Cluster:
    """A driver ``Cluster`` with the adapter's policies (not connected yet)."""
    def profile(**extra: Any) -> ExecutionProfile:
        return ExecutionProfile(
            # Requests go to the local datacenter; when its node is down they fall back to
            # one node of each other datacenter. The commit path is a cross-region quorum
            # anyway, so a region whose Cassandra died can keep serving through its
            # neighbours (measured in the kill-cassandra-node drill: without this, the
            # region's shards were unavailable for the whole outage).
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(
                local_dc=local_dc, used_hosts_per_remote_dc=1)),
            retry_policy=NoBlindRetryPolicy(),
            # Rows come back as dicts because the answer to a CAS that was not applied has
            # columns that depend on what was found; reads then map names to dataclasses.
            row_factory=dict_factory,
            request_timeout=request_timeout_s,
            **extra)

    return Cluster(contact_points=list(contact_points), port=port,
                   execution_profiles={
                       EXEC_PROFILE_DEFAULT: profile(),
                       # The plan is the local node, then one node of each other region.
                       PROFILE_HEDGED: profile(speculative_execution_policy=(
                           ConstantSpeculativeExecutionPolicy(HEDGE_DELAY_S,
                                                              HEDGE_EXTRA_MAX)))},
                   # A restarted node is tried again every second, not after the
                   # driver's exponential backoff (which kept a healed region away
                   # for ~30 s in the drills).
                   reconnection_policy=ConstantReconnectionPolicy(
                       RECONNECT_DELAY_S, max_attempts=None),
                   # Cassandra 5 speaks v5; naming it skips the driver's downgrade
                   # dance (and its warning) on every connect.
                   protocol_version=5,
                   # The driver writes a request in 4 KB chunks. Without TCP_NODELAY,
                   # Nagle holds the last chunk until the server ACKs the previous one,
                   # which the server delays by up to 40 ms: every request of 4-200 KB
                   # (any group commit) took ~45 ms instead of ~3 ms on loopback.
                   sockopts=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


class NoBlindRetryPolicy(RetryPolicy):
    """The driver's default policy, except that it never re-sends a non-idempotent statement.

    The default retries any statement on the next node after a connection error. For an
    append (a CAS) that could run the same proposal twice; the second run would then find its
    own batch and look like a lost race. The adapter resolves such outcomes itself.
    """

    def on_request_error(self, query, consistency, error, retry_num):
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_request_error(query, consistency, error, retry_num)

    def on_write_timeout(self, query, consistency, write_type, required_responses,
                         received_responses, retry_num):
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_write_timeout(query, consistency, write_type, required_responses,
                                        received_responses, retry_num)

    def on_unavailable(self, query, consistency, required_replicas, alive_replicas,
                       retry_num):
        # Unavailable is not proof that a CAS did nothing: the commit phase checks liveness
        # again after the proposal was accepted. Never re-send; resolve instead.
        if query is not None and not query.is_idempotent:
            return self.RETHROW, None
        return super().on_unavailable(query, consistency, required_replicas, alive_replicas,
                                      retry_num)


class Fanout:
    """Runs many independent statements with at most ``concurrency`` in flight.

    The next statement is started from the driver callback of a finished one, so a call with
    many statements costs neither an asyncio task nor a thread per statement. Driver callbacks
    run on the driver's thread (or inline, when a response is already there), hence the
    re-entrant lock. A statement refused because the connection is busy was not sent; it is
    started again after a short pause, until the deadline. Any other error stops launching,
    and the future fails once everything in flight has finished, so that no write of this
    call is still running when the caller hears of the failure.
    """

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop,
                 statements: Sequence[Statement], concurrency: int, timeout_s: float):
        self._session = session
        self._loop = loop
        self._statements = statements
        self._next = 0
        self._in_flight = 0
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._deadline = loop.time() + timeout_s
        self._error: BaseException | None = None
        self._settled = False
        self._lock = threading.RLock()
        self.future: asyncio.Future = loop.create_future()

    def start(self) -> asyncio.Future:
        with self._lock:
            while self._in_flight < self._concurrency and self._launch_next():
                pass
            self._finish_if_done()
        return self.future

    def _launch_next(self) -> bool:
        # Lock held.
        if self._error is not None or self._next >= len(self._statements):
            return False
        statement = self._statements[self._next]
        self._next += 1
        self._in_flight += 1
        self._send(statement, 0)
        return True

    def _send(self, statement: Statement, busy_count: int) -> None:
        # Lock held; the statement is counted in flight.
        metrics.STORE_STATEMENTS.inc()
        try:
            response = self._session.execute_async(statement, timeout=self._timeout_s)
        except Exception as exc:  # e.g. the session is shut down
            self._on_error(exc, statement, busy_count)
            return
        response.add_callbacks(self._on_done, self._on_error,
                               errback_args=(statement, busy_count))

    def _resend(self, statement: Statement, busy_count: int) -> None:
        with self._lock:
            if self._error is not None:
                self._in_flight -= 1
                self._finish_if_done()
            else:
                self._send(statement, busy_count)

    def _on_done(self, _rows: Any) -> None:
        with self._lock:
            self._in_flight -= 1
            self._launch_next()
            self._finish_if_done()

    def _on_error(self, exc: BaseException, statement: Statement, busy_count: int) -> None:
        with self._lock:
            if (connection_busy(exc) and self._error is None
                    and self._loop.time() < self._deadline):
                # Still counted in flight while it waits for its next try.
                call_threadsafe(self._loop, self._loop.call_later, busy_pause_s(busy_count),
                                 self._resend, statement, busy_count + 1)
                return
            self._in_flight -= 1
            if self._error is None:
                self._error = exc
            self._finish_if_done()

    def _finish_if_done(self) -> None:
        # Lock held.
        if self._settled or self._in_flight:
            return
        if self._error is not None or self._next >= len(self._statements):
            self._settled = True
            call_threadsafe(self._loop, _settle, self.future, None, self._error)


def connection_busy(exc: BaseException) -> bool:
    """True if the driver refused to send because every connection was full.

    The libev connection refuses new requests while the socket's send buffer is full (large
    group commits fill it quickly) and the pool refuses when all stream ids are taken. The
    request never left the client, so trying again later is safe even for a CAS.
    """
    if not isinstance(exc, NoHostAvailable) or not exc.errors:
        return False
    return all(isinstance(e, (ConnectionBusy, NoConnectionsAvailable))
               for e in exc.errors.values())


def never_sent(exc: BaseException) -> bool:
    """True if no node received the request, so a CAS cannot have been proposed.

    The driver raises NoHostAvailable when its query plan is exhausted. For a non-idempotent
    statement that happens only before sending (NoBlindRetryPolicy never moves an answered
    request to the next host), so the per-host errors are client-side connection errors;
    anything else in there is treated as unknown, defensively.
    """
    if not isinstance(exc, NoHostAvailable) or not exc.errors:
        return False
    return all(isinstance(e, (ConnectionBusy, NoConnectionsAvailable, ConnectionException))
               for e in exc.errors.values())


def busy_pause_s(busy_count: int) -> float:
    # 1 ms, doubling up to 50 ms: the socket drains at loopback/LAN speed.
    return min(0.001 * (2 ** busy_count), 0.05)


def call_threadsafe(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        # The loop was closed while the driver was still answering: nobody is waiting.
        pass


class Driver:
    """One connected session, with asyncio-facing calls.

    Args:
        session: A connected driver session.
        keyspace: Substituted for ``{ks}`` in prepared CQL.
        serial_consistency: The serial consistency every prepared statement carries.
        timeout_s: Client-side deadline of one statement, and of a wait for a busy
            connection.
    """

    def __init__(self, session: Session, keyspace: str, serial_consistency: int,
                 timeout_s: float) -> None:
        self.session = session
        self.keyspace = keyspace
        self.serial_consistency = serial_consistency
        self.timeout_s = timeout_s

    def prepare(self, cql: str, consistency: int, *, idempotent: bool) -> PreparedStatement:
        """Prepare ``cql`` (blocking: call it off the event loop, at construction)."""
        # Consistency, serial consistency and idempotence are stated on every statement
        # (bound statements inherit them), never left to session defaults.
        statement = self.session.prepare(cql.format(ks=self.keyspace))
        statement.consistency_level = consistency
        statement.serial_consistency_level = self.serial_consistency
        statement.is_idempotent = idempotent
        # Reads page by key (``seq > ?``, ``version > ?``, ``wallet_id > ?``, each with a
        # LIMIT), so driver paging is never needed and stays off.
        statement.fetch_size = None
        return statement

    def start(self, statement: Statement, params: Sequence[Any] | None) -> asyncio.Future:
        """Start one statement; the returned future resolves on the event loop.

        The driver calls back on its own I/O thread; ``call_soon_threadsafe`` hands the
        result over to the loop that awaits it.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        metrics.STORE_STATEMENTS.inc()
        # (A plain CQL string, as tools send, is never idempotent to the driver.)
        profile = (PROFILE_HEDGED if _hedged.get() and getattr(statement, "is_idempotent", False)
                   else EXEC_PROFILE_DEFAULT)
        response = self.session.execute_async(statement, params, timeout=self.timeout_s,
                                              execution_profile=profile)
        if profile is PROFILE_HEDGED:
            def count_hedge(_: Any) -> None:
                if len(response.attempted_hosts) > 1:
                    metrics.STORE_HEDGED.inc()
            response.add_callbacks(count_hedge, count_hedge)
        response.add_callbacks(
            lambda rows: call_threadsafe(loop, _settle, future, rows, None),
            lambda exc: call_threadsafe(loop, _settle, future, None, exc))
        return future

    async def run(self, statement: Statement, params: Sequence[Any] | None = None) -> Any:
        """Run one statement; wait and resend while the driver's connections are full."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        busy_count = 0
        while True:
            try:
                return await self.start(statement, params)
            except NoHostAvailable as exc:
                if not connection_busy(exc) or asyncio.get_running_loop().time() >= deadline:
                    raise
            # Back-pressure, not synchronization: the request was not sent.
            await asyncio.sleep(busy_pause_s(busy_count))
            busy_count += 1

    async def read(self, statement: Statement, params: Sequence[Any]) -> list[dict]:
        """Run a read; driver failures become ``StoreUnavailable`` (a read writes nothing)."""
        try:
            rows = await self.run(statement, params)
        except DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"read failed: {type(exc).__name__}: {exc}") from exc
        return list(rows or ())

    async def write_all(self, statements: Sequence[Statement],
                        concurrency: int = ROWS_IN_FLIGHT_MAX) -> None:
        """Run independent statements, at most ``concurrency`` at a time (``Fanout``).

        Raises:
            One of ``DRIVER_ERRORS``: a statement failed (after everything in flight ended).
        """
        if not statements:
            return
        fanout = Fanout(self.session, asyncio.get_running_loop(), statements,
                        concurrency, self.timeout_s)
        await fanout.start()
