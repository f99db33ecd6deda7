"""Who owns which shard, as etcd shows it, polled while a drill runs.

The watcher reads etcd's owner keys directly with the etcd client (``pyetcd``) rather than
through ``ledgerctl shards``: it polls every 0.2 s for minutes, and a subprocess per poll
would cost more CPU than the drill can spare on a 2-core machine. The keys it reads are the
shard map's published layout: ``<prefix>/owner/<shard>`` holding JSON with ``node_id`` and
``region``; the key's create revision is the owner's epoch.
"""

from __future__ import annotations

import asyncio
import json
import time

from clients.chaos.constants import WATCH_PERIOD_S, WATCH_READ_TIMEOUT_S


class OwnerWatcher:
    """Polls the deployment's owner keys in etcd; keeps the current owners and every change.

    Polling (not a watch) keeps this independent of the code under test and survives etcd
    restarts: an unreachable etcd is recorded as such and polling goes on.
    """

    def __init__(self, endpoint: str, prefix: str, t0: float) -> None:
        import pyetcd

        # Every member (``HOST:PORT[,...]``): a region's loss takes one of them, and the next
        # poll reads from another (a failed member is passed over for a second).
        members = [item.rpartition(":") for item in endpoint.split(",")]
        self._client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=[pyetcd.Endpoint(host or "127.0.0.1", int(port), secure=False,
                                       time_retry=1.0 if len(members) > 1 else 0.0)
                       for host, _, port in members],
            timeout=WATCH_READ_TIMEOUT_S, failover=len(members) > 1)
        self._root = prefix.rstrip("/") + "/owner/"
        self.t0 = t0
        self.owners: dict[int, tuple[str, str, int]] = {}  # shard -> (node, region, epoch)
        self.changes: list[tuple[float, int, str | None, str | None, int]] = []
        self.unreachable: list[float] = []
        self._task: asyncio.Task | None = None

    def _read(self) -> dict[int, tuple[str, str, int]]:
        response = self._client.get_prefix_response(self._root)
        out = {}
        for kv in response.kvs:
            shard = int(kv.key.decode().rsplit("/", 1)[1])
            doc = json.loads(kv.value)
            out[shard] = (str(doc["node_id"]), str(doc.get("region", "")), kv.create_revision)
        return out

    async def poll_once(self) -> None:
        try:
            now_owners = await asyncio.to_thread(self._read)
        except Exception:  # etcd away (restart drill) or slow: note it, poll again
            self.unreachable.append(time.monotonic() - self.t0)
            return
        t = time.monotonic() - self.t0
        for shard in sorted(set(now_owners) | set(self.owners)):
            old, new = self.owners.get(shard), now_owners.get(shard)
            if old != new:
                self.changes.append((round(t, 3), shard, new[0] if new else None,
                                     new[1] if new else None, new[2] if new else 0))
        self.owners = now_owners

    async def _loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(WATCH_PERIOD_S)

    def start(self) -> None:
        """Poll in the background until ``stop``; the task is kept, and ``stop`` awaits it."""
        self._task = asyncio.create_task(self._loop(), name="chaos-owner-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            self._client.close()
        except Exception:  # closing a channel that failed may raise; nothing to do
            pass

    def shards_of(self, node_id: str) -> dict[int, int]:
        """Shard -> epoch of every shard ``node_id`` owns now."""
        return {s: epoch for s, (node, _, epoch) in self.owners.items() if node == node_id}

