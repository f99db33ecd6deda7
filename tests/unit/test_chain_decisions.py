"""Issue 7, defect 11: chain decisions and prepared chain items agree on how long they live.

Decisions were purged after the idempotency retention (24 h) while prepared chain holds
never expire: an item still prepared after that asked the primary, which had forgotten a
COMMIT and recorded an abort, so one chain committed on some shards and aborted on another.
Now (presumed abort) an abort may be forgotten, a commit is kept until every participant
reported its items finished, and a commit asked for a chain older than a purge is an abort.
"""

from ledger.core import codec
from ledger.core.model import ChainFinished, DecideChain, ExpireIdempotency
from ledger.core.shard import ShardState
from ledger.core.step import step as core_step

DAY_MS = 24 * 3600 * 1000


def step(state, command):
    return core_step(state, [command]).outcomes[0]


def test_commit_is_kept_past_retention_until_every_participant_finished():
    primary = ShardState(0)
    assert step(primary, DecideChain("c1", True, 1_000, (0, 3, 5))).value is True
    assert step(primary, DecideChain("c2", False, 1_000)).value is False
    step(primary, ChainFinished("c1", 0))
    step(primary, ExpireIdempotency(1_000 + DAY_MS))
    # The abort is forgotten (absence means abort); the commit is not: 3 and 5 may ask.
    assert "c2" not in primary.chains and primary.chains["c1"] == (True, 1_000)
    assert step(primary, DecideChain("c1", False, 2 * DAY_MS)).value is True
    step(primary, ChainFinished("c1", 3))
    step(primary, ChainFinished("c1", 5))
    step(primary, ExpireIdempotency(1_000 + DAY_MS + 1))
    assert "c1" not in primary.chains and not primary.chain_waiting


def test_a_commit_asked_after_a_purge_for_an_older_chain_is_an_abort():
    primary = ShardState(0)
    assert step(primary, DecideChain("old", False, 1_000)).value is False  # recovery aborted
    step(primary, ExpireIdempotency(1_000 + DAY_MS))
    assert "old" not in primary.chains
    # The chain's own coordinator wakes up late and asks to commit: it must not.
    assert step(primary, DecideChain("old", True, 1_000, (0, 1))).value is False
    assert primary.chains["old"][0] is False
    # A fresh chain commits as usual.
    assert step(primary, DecideChain("new", True, 2 * DAY_MS, (0, 1))).value is True


def test_waiting_participants_and_the_purge_mark_survive_a_snapshot():
    primary = ShardState(0)
    step(primary, DecideChain("c0", False, 100))
    step(primary, DecideChain("c1", True, 1_000, (0, 3)))
    step(primary, ExpireIdempotency(500))  # forgets c0
    again = codec.snapshot_loads(codec.snapshot_dumps(primary))
    assert again.chain_waiting == {"c1": {0, 3}} and again.chains_purged_before == 500
