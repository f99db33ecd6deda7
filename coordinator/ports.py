"""The ports the coordinator uses, declared here, on the side that uses them.

Adapters: ``shard_router.router.Router`` is the ``ShardExecutor``; the stores of
``ledger.store`` are ``HistoryReader``s; ``ledger.runtime.clock.now_ms`` is the clock. None of
them is imported here, so the coordinator depends only on the pure core and the runtime.
"""

from __future__ import annotations

from typing import Protocol

from ledger.core.model import Entry, Transfer
from ledger.core.status import Outcome


class ShardExecutor(Protocol):
    """Runs commands on the owner of any shard, local or remote."""

    async def execute(self, shard: int, commands: list, wait_credit: bool = False,
                      deadline: float | None = None) -> list[Outcome]:
        """Run ``commands`` in order on the owner of ``shard``.

        Every command the coordinator sends is safe to send again (idempotent by key, by
        transfer id, or a read), so the executor may retry it on the shard's next owner.

        Args:
            shard: The shard.
            commands: Shard commands (``ledger.core.model``), applied in list order.
            wait_credit: Hold the answer of a committed cross-shard Post until its credit
                leg landed (bounded), so that it says ``credited=True``.
            deadline: Loop time (``asyncio`` loop's monotonic clock) after which no attempt
                starts and no answer is waited for; None for the executor's own budget.

        Returns:
            One outcome per command, in order. All ``SHARD_UNAVAILABLE`` when no owner
            answered in time: transient, nothing refused (the commands may have been
            applied; a retry is answered from the record). Never raises for a shard that
            is down.
        """
        ...


class HistoryReader(Protocol):
    """The materialized history: transfers past the owners' idempotency window, entries."""

    async def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The transfer's row, or None if there is none (yet: rows lag the journal).

        Raises:
            StoreUnavailable: the store did not answer.
        """
        ...

    async def list_entries(self, wallet_id: str, after_version: int,
                           limit: int) -> list[Entry]:
        """Up to ``limit`` entries of the wallet with a version above ``after_version``, in
        version order (rows lag the journal by a bounded time).

        Raises:
            StoreUnavailable: the store did not answer.
        """
        ...
