"""The ``Ownership`` port's contract, run against every adapter: ``LocalOwnership`` (the
embedded default) and ``EtcdOwnership`` on the real etcd of the session's test cluster.

Proves, for each adapter with one node of one region:
  * grant on start: every shard is gained with a positive epoch, and ``owner()`` and
    ``placements()`` agree with what the listener heard;
  * ``lease_valid()`` holds while shards are granted; with a lease (etcd) it does not before
    ``start`` or after ``close``, without one (local) it always holds;
  * ``release(shard)`` grants the shard again with a higher epoch (a loss, if reported,
    comes before the new gain), and ``owner()`` follows;
  * listener calls of a shard come in order, a loss only after a gain, and the epochs of a
    shard's gains only increase (checked after every test);
  * ``close()`` reports the loss of every granted shard before it returns, a second close
    does nothing, and a release after it does nothing;
  * misuse is refused: ``start()`` twice, a release of a shard out of range.

Moves between nodes, losses on late keep-alives and failover across regions need several
nodes and an elector: ``tests/integration/test_etcd_ownership.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import pytest

from shard_router.ownership import Ownership

SHARDS = 4
REGION = "r1"
LEASE_TTL_S = 3.0
GRACE_S = 1.0
# Waits: a campaign round, or a release's hold (three grace periods) and a campaign, with
# slack for a loaded machine.
GRANT_TIMEOUT_S = 20.0


@dataclass
class Recorder:
    """Every listener call, in order, and a condition to wait on them."""

    calls: list[tuple[int, int]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def listener(self, shard: int, epoch: int) -> None:
        async with self.changed:
            self.calls.append((shard, epoch))
            self.changed.notify_all()

    def owned(self) -> dict[int, int]:
        """Shard -> epoch, as the listener was last told."""
        state: dict[int, int] = {}
        for shard, epoch in self.calls:
            state[shard] = epoch
        return {s: e for s, e in state.items() if e}

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        async with self.changed:
            try:
                async with asyncio.timeout(GRANT_TIMEOUT_S):
                    await self.changed.wait_for(predicate)
            except TimeoutError:
                raise AssertionError(f"timed out after {GRANT_TIMEOUT_S:.0f}s waiting for "
                                     f"{what}; calls: {self.calls}") from None

    def check_order(self) -> None:
        """Per shard: gains with increasing epochs, a loss only after a gain."""
        last_gain: dict[int, int] = {}
        serving: dict[int, bool] = {}
        for shard, epoch in self.calls:
            if epoch:
                assert epoch > last_gain.get(shard, 0), (shard, epoch, self.calls)
                last_gain[shard] = epoch
                serving[shard] = True
            else:
                assert serving.get(shard), f"loss of shard {shard} never gained: {self.calls}"
                serving[shard] = False


@dataclass
class Own:
    ownership: Ownership
    recorder: Recorder
    adapter: str


def _local() -> Ownership:
    from shard_router.local import LocalOwnership
    return LocalOwnership(SHARDS, epoch=int(time.time() * 1000), node_id="n1", region=REGION)


def _etcd(endpoint: str) -> Ownership:
    from shard_router.etcd import EtcdOwnership
    return EtcdOwnership(endpoint, "n1", REGION, "127.0.0.1:1", [REGION], shard_count=SHARDS,
                         lease_ttl_s=LEASE_TTL_S, takeover_grace_s=GRACE_S,
                         prefix=f"/test-contract-{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["local", pytest.param("etcd", marks=pytest.mark.real)])
async def own(request) -> AsyncIterator[Own]:
    ownership = (_local() if request.param == "local"
                 else _etcd(request.getfixturevalue("etcd_endpoint")))
    recorder = Recorder()
    await ownership.start(recorder.listener)
    try:
        yield Own(ownership, recorder, request.param)
    finally:
        await ownership.close()
        recorder.check_order()


@pytest.fixture(params=["local", pytest.param("etcd", marks=pytest.mark.real)])
def etcd_or_local_unstarted(request) -> tuple[Ownership, str]:
    """An adapter that was never started (nothing to close)."""
    ownership = (_local() if request.param == "local"
                 else _etcd(request.getfixturevalue("etcd_endpoint")))
    return ownership, request.param


async def granted(own: Own) -> dict[int, int]:
    """Wait until this (only) node has been granted every shard; shard -> epoch."""
    await own.recorder.wait_for(lambda: len(own.recorder.owned()) == SHARDS,
                                 "every shard to be granted")
    return own.recorder.owned()


async def test_every_shard_is_granted_on_start(own):
    epochs = await granted(own)
    assert all(epoch > 0 for epoch in epochs.values())
    for shard, epoch in epochs.items():
        info = own.ownership.owner(shard)
        assert info is not None and info.shard == shard
        assert (info.node_id, info.region, info.epoch) == ("n1", REGION, epoch)
    assert [(p.shard, p.home_region) for p in own.ownership.placements()] == [
        (s, REGION) for s in range(SHARDS)]


async def test_the_lease_is_valid_while_shards_are_granted(own):
    await granted(own)
    assert own.ownership.lease_valid()


async def test_the_lease_is_not_valid_before_start(etcd_or_local_unstarted):
    ownership, adapter = etcd_or_local_unstarted
    assert ownership.lease_valid() is (adapter == "local")


async def test_release_grants_the_shard_again_with_a_higher_epoch(own):
    before = await granted(own)
    shard = 2
    mark = len(own.recorder.calls)
    await own.ownership.release(shard)
    await own.recorder.wait_for(
        lambda: any(s == shard and e for s, e in own.recorder.calls[mark:]),
        f"shard {shard} to be granted again")
    after = [e for s, e in own.recorder.calls[mark:] if s == shard]
    # At most one loss, and only before the new gain.
    assert after[-1] > before[shard] and after[:-1] in ([], [0]), after
    assert own.ownership.owner(shard).epoch == after[-1]
    # The other shards stay as they were.
    assert {s: e for s, e in own.recorder.owned().items() if s != shard} == {
        s: e for s, e in before.items() if s != shard}


async def test_releases_again_keep_raising_the_epoch(own):
    await granted(own)
    shard = 0
    for _ in range(2):
        mark = len(own.recorder.calls)
        await own.ownership.release(shard)
        await own.recorder.wait_for(
            lambda mark=mark: any(s == shard and e for s, e in own.recorder.calls[mark:]),
            f"shard {shard} to be granted again")
    # ``check_order`` (after the test) asserts the epochs only increased.


async def test_close_reports_every_loss_before_it_returns(own):
    epochs = await granted(own)
    await own.ownership.close()
    assert own.recorder.owned() == {}
    losses = [s for s, e in own.recorder.calls if e == 0]
    assert sorted(losses) == sorted(epochs)
    # A lease ends with close; the local adapter has none (nothing can depose it).
    assert own.ownership.lease_valid() is (own.adapter == "local")
    mark = len(own.recorder.calls)
    await own.ownership.close()
    await own.ownership.release(1)
    assert own.recorder.calls[mark:] == []


async def test_misuse_is_refused(own):
    await granted(own)
    with pytest.raises(RuntimeError):
        await own.ownership.start(own.recorder.listener)
    with pytest.raises(ValueError):
        await own.ownership.release(SHARDS)
