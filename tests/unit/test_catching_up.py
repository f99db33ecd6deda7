"""What ``CassandraStore.catching_up`` says of the other nodes' pending hints (``hints_for``).

The table is Cassandra's (``system_views.pending_hints``, one row per node the asked node
holds hints for); which of them mean "this region is catching up" is decided here. The real
table is read in the kill-region drills (README "Heal without stalls"): waiting for its hint
files to appear in a test took 10-60 s and more on this machine.
"""

from __future__ import annotations

import datetime

from ledger.store.cassandra.constants import CATCH_UP_BACKLOG_S
from ledger.store.cassandra.store import hints_for

OLDEST = datetime.datetime(2026, 11, 28, 11, 4, 15)
NOW = OLDEST + datetime.timedelta(seconds=75)


def row(dc: str, files: int | None, address: str = "127.0.0.2",
        oldest: datetime.datetime | None = OLDEST) -> dict:
    return {"address": address, "dc": dc, "files": files, "oldest": oldest, "port": 7000,
            "rack": "rack1", "status": "UP"}


def test_hints_for_a_node_of_this_region_are_named_with_who_holds_them_and_since_when():
    assert hints_for("r2", "r1", [row("r2", 6)], NOW) == [
        "r1 holds 6 hint file(s) for 127.0.0.2 since 11:04:15"]
    assert hints_for("r2", "r3", [row("r2", 1, "10.0.2.7", oldest=None)], NOW) == [
        "r3 holds 1 hint file(s) for 10.0.2.7"]


def test_hints_for_other_regions_none_left_or_only_fresh_ones_say_nothing():
    assert hints_for("r2", "r1", [], NOW) == []
    assert hints_for("r2", "r1", [row("r3", 4), row("r2", 0), row("r2", None)], NOW) == []
    # A mutation dropped a moment ago under load: delivered by the next dispatch.
    fresh = NOW - datetime.timedelta(seconds=CATCH_UP_BACKLOG_S - 1)
    assert hints_for("r2", "r1", [row("r2", 1, oldest=fresh)], NOW) == []
    backlog = NOW - datetime.timedelta(seconds=CATCH_UP_BACKLOG_S)
    assert hints_for("r2", "r1", [row("r2", 1, oldest=backlog)], NOW) != []
